"""Tests for tokenizer.py (Tokenizer and chat templates), against transformers 5.24.

The folders are built here: a byte-level BPE trained on a few sentences and padded to the
real vocabulary size of Qwen2.5 / Llama-3.1, so that their special tokens sit at their real
ids (151643.. and 128000..), with the real tokenizer_config.json keys and chat templates of
Qwen2.5-Instruct and Llama-3.1-Instruct (copied from the public checkpoints' files).
Every prompt is compared, as text and as ids, with what transformers makes of the same folder.
"""

import json
import os
import shutil

import pytest
import tokenizers
import transformers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tokenizer import CHATML_TEMPLATE, Tokenizer

# The paper's prompts always carry a system message.
SYSTEM = ("You are a helpful assistant. Use your expertise to provide the most precise translation. "
          "Answer with one single German sentence.")
USER = "Translate the sign language video into German: <video>"
ANSWER = "Am Montag gibt es im Norden Nebel."
CHATS = {
    "system+user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
    "system+user+assistant": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                              {"role": "assistant", "content": ANSWER}],
    "user only": [{"role": "user", "content": USER}],
}
CORPUS = [SYSTEM, USER, ANSWER, "Morgen regnet es im Süden, später Schnee.", "system user assistant",
          "You are Qwen, created by Alibaba Cloud. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
          "am montag gibt es nebel . MONTAG NEBEL NORD WETTER cl-KOMMEN"] * 3

# Qwen2.5-Instruct's tokenizer_config.json "chat_template", verbatim.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama-3.1-Instruct's tokenizer_config.json "chat_template", verbatim.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = \"26 Jul 2024\" %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- System message + builtin tools #}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if builtin_tools is defined or tools is not none %}\n"
    "    {{- \"Environment: ipython\\n\" }}\n"
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n"
    "{%- endif %}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n"
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "    {{- first_user_message + \"<|eot_id|>\"}}\n"
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n"
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n"
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    "            {{- \")\" }}\n"
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- \"}\" }}\n"
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    "            {{- \"<|eom_id|>\" }}\n"
    "        {%- else %}\n"
    "            {{- \"<|eot_id|>\" }}\n"
    "        {%- endif %}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5's added tokens from 151643 on: (content, special)
QWEN_ADDED = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                  "<|image_pad|>", "<|video_pad|>")] + \
             [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                   "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")]
# Llama-3.1's 256 special tokens from 128000 on
LLAMA_ADDED = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
               + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])


def _byte_bpe(split: str, n_vocab: int, nfc: bool, ignore_merges: bool = False) -> tokenizers.Tokenizer:
    """A byte-level BPE as Qwen2 / Llama-3 build theirs, trained on CORPUS, its vocabulary padded
    with unreachable entries to `n_vocab` so that added tokens get the checkpoint's real ids."""
    tok = tokenizers.Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), n_vocab)})
    spec["model"]["ignore_merges"] = ignore_merges
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _added_decoder(tok) -> dict:
    return {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _write(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("qwen25"))
    tok = _byte_bpe(QWEN_SPLIT, 151643, nfc=True)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED])
    assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("<|file_sep|>") == 151664
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(folder, "tokenizer.json"))
    _write(folder, "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _added_decoder(tok),
        "additional_special_tokens": [t for t, s in QWEN_ADDED[1:14]], "bos_token": None,
        "chat_template": QWEN25_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    _write(folder, "generation_config.json", {
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20})
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama31"))
    tok = _byte_bpe(LLAMA3_SPLIT, 128000, nfc=False, ignore_merges=True)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_ADDED])
    assert tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<|eot_id|>") == 128009
    assert tok.get_vocab_size(with_added_tokens=True) == 128256
    # Llama-3's tokenizer.json adds <|begin_of_text|> in its post-processor; encode() must not.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    tok.save(os.path.join(folder, "tokenizer.json"))
    _write(folder, "tokenizer_config.json", {
        "added_tokens_decoder": _added_decoder(tok), "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA31_TEMPLATE, "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _write(folder, "generation_config.json", {
        "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6, "top_p": 0.9})
    return folder


def _copy(src, dst, drop_template=False, **config_changes):
    """A copy of a folder, its tokenizer_config.json edited."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    if drop_template:
        del config["chat_template"]
    config.update(config_changes)
    _write(dst, "tokenizer_config.json", config)
    return str(dst)


_HF = {}


def _hf(folder):
    """transformers' tokenizer for a folder (the fixture folders are loaded once: ~1 s each)."""
    if folder not in _HF:
        _HF[folder] = transformers.AutoTokenizer.from_pretrained(folder)
    return _HF[folder]


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return Tokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return Tokenizer.from_pretrained(llama_dir)


def _hf_chat(hf, messages, **kw):
    text = hf.apply_chat_template(messages, tokenize=False, **kw)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    return text, list(ids)


# ============================================================================ chat templates

@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_qwen25_template_matches_transformers(qwen, qwen_dir, loader):
    tok = qwen
    if loader == "AutoTokenizer":  # Qwen2Tokenizer: rebuilds the backend from vocab + merges
        hf = _hf(qwen_dir)
        assert type(hf).__name__ == "Qwen2Tokenizer"
    else:                          # tokenizer.json as it is
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(qwen_dir, "tokenizer.json"), chat_template=QWEN25_TEMPLATE,
            eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for name, chat in CHATS.items():
        for gen in (False, True):
            text, ids = _hf_chat(hf, chat, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == text, (name, gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == ids, (name, gen)


def test_qwen25_prompt_values(qwen):
    tok = qwen
    text = tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True, tokenize=False)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # Without a system message Qwen2.5 writes its own.
    assert tok.apply_chat_template(CHATS["user only"], tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    ids = tok.apply_chat_template(CHATS["system+user+assistant"])
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 3
    assert ids[-2:] == [151645, tok.encode("\n")[0]]
    # The answer's tokens sit between the last <|im_start|>assistant\n and <|im_end|>.
    start = len(tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True))
    assert tok.decode(ids[start:]) == ANSWER + "\n"
    assert tok.decode(ids[start:], skip_special_tokens=False) == ANSWER + "<|im_end|>\n"


def test_llama31_template_matches_transformers(llama, llama_dir):
    tok, hf = llama, _hf(llama_dir)
    for name, chat in CHATS.items():
        for gen in (False, True):
            text, ids = _hf_chat(hf, chat, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == text, (name, gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == ids, (name, gen)
    # Extra keyword arguments are template variables, as in transformers.
    text, ids = _hf_chat(hf, CHATS["system+user"], add_generation_prompt=True, date_string="01 Jan 2025")
    assert tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True, date_string="01 Jan 2025") == ids
    assert "Today Date: 01 Jan 2025\n\n" in text


def test_llama31_prompt_values(llama):
    tok = llama
    text = tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True, tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                    f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{USER}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True)
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1  # one BOS: the template's
    tail = [128006, *tok.encode("assistant"), 128007, *tok.encode("\n\n")]
    assert ids[-len(tail):] == tail


def test_template_errors_and_inputs(qwen, qwen_dir, tmp_path):
    tok = qwen
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="message 0"):
        tok.apply_chat_template(["hello"])
    strict = Tokenizer.from_pretrained(_copy(qwen_dir, tmp_path / "strict", chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")))
    with pytest.raises(ValueError, match="System role not supported"):
        strict.apply_chat_template(CHATS["system+user"])
    # None-valued keys are dropped as transformers drops them (the template sees no tool_calls).
    chat = CHATS["system+user+assistant"][:2] + [{"role": "assistant", "content": ANSWER, "tool_calls": None}]
    assert tok.apply_chat_template(chat) == tok.apply_chat_template(CHATS["system+user+assistant"])


def test_template_sources(qwen_dir, tmp_path):
    # A list of named templates: "default" is used (the legacy multi-template format).
    listed = _copy(qwen_dir, tmp_path / "listed", chat_template=[
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": QWEN25_TEMPLATE}])
    tok, hf = Tokenizer.from_pretrained(listed), _hf(listed)
    assert tok.apply_chat_template(CHATS["system+user"]) == _hf_chat(hf, CHATS["system+user"])[1]
    nodefault = _copy(qwen_dir, tmp_path / "nodefault", chat_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match="no 'default'"):
        Tokenizer.from_pretrained(nodefault)
    # chat_template.jinja (what transformers 5 writes) wins over the config, as in transformers.
    jinja = _copy(qwen_dir, tmp_path / "jinja")
    with open(os.path.join(jinja, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok, hf = Tokenizer.from_pretrained(jinja), _hf(jinja)
    assert tok.apply_chat_template(CHATS["user only"], tokenize=False) == f"[user]{USER}<|im_end|>"
    assert tok.apply_chat_template(CHATS["user only"]) == _hf_chat(hf, CHATS["user only"])[1]


# ============================================================================ built-in formats

def test_builtin_chatml_without_template(qwen_dir, tmp_path):
    # A Qwen base folder: no template, eos <|endoftext|>; ChatML turns end with <|im_end|>, so it stops too.
    base = _copy(qwen_dir, tmp_path / "base", drop_template=True, eos_token="<|endoftext|>")
    _write(base, "generation_config.json", {"bos_token_id": 151643, "eos_token_id": 151643})
    tok = Tokenizer.from_pretrained(base)
    assert tok.eos_token_ids == [151643, 151645]
    for gen in (False, True):
        text = tok.apply_chat_template(CHATS["system+user+assistant"][: 3 - gen], add_generation_prompt=gen,
                                       tokenize=False)
        want = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
        assert text == (want if gen else want + f"{ANSWER}<|im_end|>\n")
    # No default system prompt in the built-in format.
    assert tok.apply_chat_template(CHATS["user only"], tokenize=False) == f"<|im_start|>user\n{USER}<|im_end|>\n"
    ids = tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True)
    tail = [151644, *tok.encode("assistant\n")]
    assert ids[0] == 151644 and ids[-len(tail):] == tail
    # Saved, the folder carries the template in use, and transformers then renders the same prompt.
    tok.save_pretrained(str(tmp_path / "saved"))
    hf = _hf(str(tmp_path / "saved"))
    assert _hf_chat(hf, CHATS["system+user"], add_generation_prompt=True)[1] == ids
    assert Tokenizer.from_pretrained(str(tmp_path / "saved")).eos_token_ids == [151643, 151645]


def test_builtin_llama3_without_template(llama_dir, tmp_path):
    base = _copy(llama_dir, tmp_path / "base", drop_template=True, eos_token="<|end_of_text|>")
    tok = Tokenizer.from_pretrained(base)
    assert tok.eos_token_ids == [128001, 128008, 128009]
    text = tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True, tokenize=False)
    assert text == (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
                    f"<|start_header_id|>user<|end_header_id|>\n\n{USER}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(CHATS["system+user"], add_generation_prompt=True)
    assert ids[:2] == [128000, 128006] and ids.count(128009) == 2


def test_no_template_no_known_tokens(tmp_path):
    tokenizers.Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("a") == [0] and tok.eos_token_ids == []
    with pytest.raises(ValueError, match=f"{tmp_path}: no chat_template .* add a chat_template"):
        tok.apply_chat_template(CHATS["user only"])
    with pytest.raises(ValueError, match="no pad_token and no eos"):
        tok.pad_token_id


# ============================================================================ encode / decode / ids

def test_encode_decode_match_transformers(qwen, llama, qwen_dir, llama_dir):
    text = "Am Montag<|im_end|> gibt es <|im_start|>Nebel . Grüße, 2024!\n<|begin_of_text|>"
    for tok, folder in ((qwen, qwen_dir), (llama, llama_dir)):
        hf = _hf(folder)
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    # special-token text inside a string is that token, never its characters
    assert qwen.encode("<|im_start|>user") == [151644] + qwen.encode("user")
    assert llama.encode("Hallo")[0] != 128000  # no BOS added
    assert qwen.encode("") == []


def test_eos_pad_and_sizes(qwen, llama, qwen_dir, llama_dir, tmp_path):
    assert qwen.eos_token_ids == [151645, 151643] and qwen.pad_token_id == 151643
    assert qwen.eos_token == "<|im_end|>" and qwen.bos_token is None
    assert llama.eos_token_ids == [128001, 128008, 128009] and llama.pad_token_id == 128001  # no pad: first eos
    assert llama.bos_token == "<|begin_of_text|>"
    assert len(qwen) == 151665 == len(_hf(qwen_dir))
    assert len(llama) == 128256 == len(_hf(llama_dir))
    # generation_config.json with a single int; without it, the eos token
    single = _copy(qwen_dir, tmp_path / "single")
    _write(single, "generation_config.json", {"eos_token_id": 151645})
    assert Tokenizer.from_pretrained(single).eos_token_ids == [151645]
    os.remove(os.path.join(single, "generation_config.json"))
    assert Tokenizer.from_pretrained(single).eos_token_ids == [151645]


def test_check_fits(qwen, llama, qwen_dir):
    qwen.check_fits(151936)  # Qwen2.5's embedding has more rows than tokens
    qwen.check_fits(151665)
    with pytest.raises(ValueError) as e:
        qwen.check_fits(32000, where="out/cpt")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{qwen_dir}/tokenizer.json has 151665 tokens" in msg and "out/cpt has 32000 embedding rows" in msg
    assert "same checkpoint" in msg
    llama.check_fits(128256)
    with pytest.raises(ValueError, match="128256 tokens but the model has 128000"):
        llama.check_fits(128000)


def test_missing_and_broken_files(tmp_path, qwen_dir):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value) and "\n" not in str(e.value)
    bad = _copy(qwen_dir, tmp_path / "bad")
    with open(os.path.join(bad, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(bad)


def test_config_added_tokens(tmp_path):
    # A token listed in tokenizer_config.json's added_tokens_decoder but missing from tokenizer.json
    # is added (and recognised in text) as transformers adds it; a wrong id is an error.
    folder = str(tmp_path / "tok")
    Tokenizer.train(["am montag gibt es nebel ."]).save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    n = len(Tokenizer.from_pretrained(folder))
    config["added_tokens_decoder"][str(n)] = {"content": "<video>", "special": True, "normalized": False}
    _write(folder, "tokenizer_config.json", config)
    tok, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert tok.encode("am <video> montag") == hf.encode("am <video> montag", add_special_tokens=False)
    assert tok.encode("<video>") == [n] and len(tok) == n + 1
    config["added_tokens_decoder"][str(n + 5)] = config["added_tokens_decoder"].pop(str(n))
    _write(folder, "tokenizer_config.json", config)
    with pytest.raises(ValueError, match="different checkpoints"):
        Tokenizer.from_pretrained(folder)


def test_save_pretrained_round_trip(qwen, tmp_path):
    tok = qwen
    out = str(tmp_path / "out")
    tok.save_pretrained(out)
    again, hf = Tokenizer.from_pretrained(out), _hf(out)
    for chat in CHATS.values():
        want = tok.apply_chat_template(chat, add_generation_prompt=True)
        assert again.apply_chat_template(chat, add_generation_prompt=True) == want
        assert _hf_chat(hf, chat, add_generation_prompt=True)[1] == want
    assert again.eos_token_ids == tok.eos_token_ids and again.pad_token_id == tok.pad_token_id
    assert len(again) == len(tok)
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [151645, 151643]
    # a model's own generation_config.json is left as it is
    _write(out, "generation_config.json", {"eos_token_id": 7})
    tok.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"eos_token_id": 7}


# ============================================================================ train

SYNTH = ["am montag gibt es nebel .", "MONTAG NEBEL", "am dienstag regnet es im norden .",
         "DIENSTAG NORD REGEN", "morgen scheint die sonne im süden .", "MORGEN SUED SONNE cl-KOMMEN"] * 4


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_train_round_trip_and_transformers(kind, tmp_path):
    size = 60 if kind == "wordlevel" else 400
    tok = Tokenizer.train(SYNTH, vocab_size=size, kind=kind)
    assert Tokenizer.train(SYNTH, vocab_size=size, kind=kind).backend.to_str() == tok.backend.to_str()  # deterministic
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == [im_end, eot] and tok.pad_token_id == eot and tok.eos_token == "<|im_end|>"
    for sentence in ("am montag gibt es nebel .", "DIENSTAG NORD REGEN", "morgen scheint die sonne im süden ."):
        assert tok.decode(tok.encode(sentence)) == sentence
    for line in SYNTH[:6]:  # every word and gloss of the corpus is one token
        if kind == "wordlevel" or "-" not in line:
            assert len(tok.encode(line)) == len(line.split()), line
    if kind == "wordlevel":
        assert len(tok.encode("cl-KOMMEN")) == 1 and tok.decode(tok.encode("NEBEL sonne")) == "NEBEL sonne"
    chat = [{"role": "system", "content": "am montag"}, {"role": "user", "content": "MONTAG NEBEL"},
            {"role": "assistant", "content": "am montag gibt es nebel ."}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == ("<|im_start|>system\nam montag<|im_end|>\n<|im_start|>user\nMONTAG NEBEL<|im_end|>\n"
                    "<|im_start|>assistant\nam montag gibt es nebel .<|im_end|>\n")
    ids = tok.apply_chat_template(chat)
    if kind == "wordlevel":  # whitespace is dropped: every id is a word or a special token
        assert tok.token_to_id("<|unk|>") not in ids
        assert tok.decode(ids) == "system am montag user MONTAG NEBEL assistant am montag gibt es nebel ."
    else:
        assert tok.decode(ids, skip_special_tokens=False) == text
    folder = str(tmp_path / "tok")
    tok.save_pretrained(folder)
    again, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert again.apply_chat_template(chat) == ids == _hf_chat(hf, chat)[1]
    for gen in (False, True):
        assert again.apply_chat_template(chat[:2], add_generation_prompt=gen, tokenize=False) == \
            _hf_chat(hf, chat[:2], add_generation_prompt=gen)[0]
    assert again.eos_token_ids == [im_end, eot] and again.pad_token_id == eot and len(again) == len(tok) == len(hf)
    for sentence in SYNTH[:6] + ["Grüße, 42 unbekannte Wörter!"]:
        assert again.encode(sentence) == hf.encode(sentence, add_special_tokens=False) == tok.encode(sentence)
        assert again.decode(again.encode(sentence)) == hf.decode(hf.encode(sentence, add_special_tokens=False),
                                                                 skip_special_tokens=True)
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [im_end, eot]
    assert transformers.GenerationConfig.from_pretrained(folder).eos_token_id == [im_end, eot]


def test_train_bpe_encodes_anything():
    tok = Tokenizer.train(SYNTH, vocab_size=300, kind="bpe")
    text = "Grüße — 42 ÄÖÜ 漢字 \t end"
    assert tok.decode(tok.encode(text)) == text


def test_train_bad_arguments():
    with pytest.raises(ValueError, match="kind must be"):
        Tokenizer.train(SYNTH, kind="unigram")
    with pytest.raises(ValueError, match="chat_format"):
        Tokenizer.train(SYNTH, chat_format="llama3")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([])


def test_template_environment_matches_transformers(tmp_path):
    # The helpers transformers gives templates: tojson without HTML escaping, namespace, loop
    # controls, strftime_now, {% generation %} blocks, special tokens as variables, trim/lstrip_blocks.
    template = (
        "{%- set ns = namespace(n=0) %}\n"
        "{%- for m in messages %}\n"
        "    {%- if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {%- set ns.n = ns.n + 1 %}\n"
        "    <|im_start|>{{ m['role'] }} {{ ns.n }} {{ m['content'] | tojson }}\n"
        "    {%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
        "{% endif %}\n"
        "{%- endfor %}\n"
        "{{- ' ' + strftime_now('%Y') + ' ' + pad_token + ' ' + unk_token }}\n")
    folder = str(tmp_path / "tok")
    trained = Tokenizer.train(SYNTH)
    trained.save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHATML_TEMPLATE  # the built-in format travels with the folder
    _copy(folder, tmp_path / "env", chat_template=template)
    tok, hf = Tokenizer.from_pretrained(str(tmp_path / "env")), _hf(str(tmp_path / "env"))
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": 'am <b> & "nebel"'},
            {"role": "assistant", "content": "am montag"}]
    text, ids = _hf_chat(hf, chat)
    assert tok.apply_chat_template(chat, tokenize=False) == text
    assert tok.apply_chat_template(chat) == ids
    assert '<|im_start|>user 1 "am <b> & \\"nebel\\""' in text and "<|im_start|>assistant 2" in text


def test_legacy_special_tokens_map(tmp_path):
    # Old folders name their special tokens in special_tokens_map.json only.
    folder = str(tmp_path / "tok")
    Tokenizer.train(SYNTH).save_pretrained(folder)
    _write(folder, "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                             "chat_template": CHATML_TEMPLATE})
    _write(folder, "special_tokens_map.json", {"eos_token": {"content": "<|im_end|>", "lstrip": False},
                                               "pad_token": "<|endoftext|>"})
    os.remove(os.path.join(folder, "generation_config.json"))
    tok, hf = Tokenizer.from_pretrained(folder), _hf(folder)
    assert tok.eos_token == hf.eos_token == "<|im_end|>" and tok.pad_token_id == hf.pad_token_id
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>")]
