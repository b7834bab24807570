"""The tokenizer of the LLM, off the reading path: `tokenizers.Tokenizer` (tokenizer.json) plus
what a Hugging Face folder keeps beside it: special tokens and the chat template
(tokenizer_config.json, chat_template.jinja) and the stop ids (generation_config.json).
Prompts come from the folder's own Jinja template, rendered as transformers renders it:
Llama-3.1's adds a "Cutting Knowledge Date" block, Qwen2.5's a default system prompt, and ids
must match to the token (tests/test_tokenizer.py checks both against transformers).
"""

import json
import os

import tokenizers

from errors import MissingFileError, UserError
from hf import checkpoint_folder, read_json

# Built-in formats, only for folders without a template. Written as Jinja so they take the
# same path as a folder's own template and can be saved as one (transformers then agrees).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Meta-Llama-3-Instruct's template, with the BOS written out
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# (template, token that ends a turn and so must stop generation, tokens the vocabulary needs)
_BUILTIN_FORMATS = (
    (CHATML_TEMPLATE, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    (LLAMA3_TEMPLATE, "<|eot_id|>", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
)
# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES);
# any other `*_token` key of tokenizer_config.json is passed too.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Qwen2's pre-tokenizer split (byte-level BPE), reused by Tokenizer.train(kind="bpe").
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Tokenizer.train(kind="wordlevel"): a word (internal - and ' kept, so glosses like cl-KOMMEN stay
# whole) or a run of punctuation; whitespace separates and is dropped.
_WORD_SPLIT = r"\w+(?:[-']\w+)*|[^\w\s]+"
_COMPILED_TEMPLATES = {}


def _read_json(path: str):
    return read_json(path) if os.path.isfile(path) else None


def _token_str(value, key: str, path: str):
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{path}: {key} must be a string or an AddedToken dict with 'content', got {value!r}")


def _plain(value):
    # What a template sees is rebuilt from plain JSON types (as transformers does), so no
    # object with methods reaches the sandbox.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):  # subclasses (enums, ...) carry methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _compile_chat_template(source: str):
    """Compile a chat template in the environment of transformers (utils/chat_template_utils.py):
    ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loop controls,
    `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, restricted `dict`
    and `namespace`, and `{% generation %}` blocks (rendered as their body)."""
    if source in _COMPILED_TEMPLATES:
        return _COMPILED_TEMPLATES[source]
    from datetime import datetime

    import jinja2  # imported here: only prompts need it (torch installs it too)
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        # templates come from checkpoint folders, i.e. untrusted code: older sandboxes have escapes
        raise ImportError(f"chat templates need jinja2>=3.1.6 (sandbox fixes), found {jinja2.__version__}")

    class GenerationBlock(jinja2.ext.Extension):
        # transformers uses these blocks to build assistant masks; the text is unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:  # `dict(...)` without attribute access to the dict type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no dunder attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    compiled = _COMPILED_TEMPLATES[source] = env.from_string(source)
    return compiled


class Tokenizer:
    """tokenizer.json with the special tokens, chat template and stop ids of its folder.

    tok = Tokenizer.from_pretrained(folder); ids = tok.encode(text); text = tok.decode(ids)
    ids = tok.apply_chat_template([{"role": "system", ...}, {"role": "user", ...}], add_generation_prompt=True)
    """

    def __init__(self, backend, special_tokens: dict = None, chat_template: str = None,
                 eos_token_ids=None, config: dict = None, source: str = "tokenizer"):
        self.backend = backend  # tokenizers.Tokenizer
        # {"eos_token": "<|im_end|>", ...}: the named special tokens every template sees
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template  # the folder's Jinja template; None: a built-in format
        self.config = dict(config or {})    # tokenizer_config.json as read; save_pretrained writes it back
        self.source = source                # the folder, for error messages
        for key, token in self.special_tokens.items():
            if backend.token_to_id(token) is None:
                raise UserError(f"{source}: {key} {token!r} is not in the vocabulary of tokenizer.json")
        # Stop ids: generation_config's, then the eos token, then the turn end of a built-in format
        # (a folder chatting in ChatML must stop at <|im_end|> even if its own eos is <|endoftext|>).
        ids = [int(i) for i in (eos_token_ids or [])]
        if self.eos_token is not None:
            ids.append(self.token_to_id(self.eos_token))
        builtin = self._builtin_format()
        if builtin is not None and self.chat_template in (None, builtin[0]):
            ids.append(self.token_to_id(builtin[1]))
        self.eos_token_ids = list(dict.fromkeys(ids))
        # transformers cleans " ." -> "." in decode when asked, except for BPE (it would corrupt the text)
        force_bpe = self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        self._clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE" or bool(force_bpe))

    # -------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, folder: str) -> "Tokenizer":
        folder = checkpoint_folder(folder)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise MissingFileError(f"{folder}: no tokenizer.json; put the checkpoint's tokenizer.json "
                                   "(and tokenizer_config.json, generation_config.json) in this folder")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise UserError(f"{path}: not a tokenizers file ({str(e).splitlines()[0] if str(e) else e!r})") from None
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = _read_json(config_path) or {}
        legacy = _read_json(os.path.join(folder, "special_tokens_map.json"))
        if legacy and "added_tokens_decoder" not in config:  # old folders, read as transformers does
            config = {**config, **{k: v for k, v in legacy.items() if k != "additional_special_tokens"}}
            config.setdefault("additional_special_tokens", legacy.get("additional_special_tokens"))

        special = {k: _token_str(v, k, config_path) for k, v in config.items()
                   if k in _SPECIAL_TOKEN_KEYS or (k.endswith("_token") and isinstance(v, (str, dict)))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # named model-specific tokens, e.g. {"image_token": "<|image_pad|>"}
            special.update({k: _token_str(v, k, config_path) for k, v in extra.items()})
            extra = []
        extra = [_token_str(t, "additional_special_tokens", config_path) for t in extra]
        cls._add_config_tokens(backend, config.get("added_tokens_decoder") or {},
                               [t for t in special.values() if t is not None] + extra, config_path)

        template = config.get("chat_template")
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_path):  # written by recent transformers; wins over the config, as there
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        if isinstance(template, dict):
            if "default" not in template:
                raise UserError(f"{config_path}: chat_template has no 'default' among {sorted(template)}")
            template = template["default"]

        eos = (_read_json(os.path.join(folder, "generation_config.json")) or {}).get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(backend, special, template, eos, config, source=folder)

    @staticmethod
    def _add_config_tokens(backend, added_tokens_decoder: dict, special: list, config_path: str):
        # transformers adds tokenizer_config.json's added tokens, and the special tokens it names,
        # when tokenizer.json lacks them; then they are recognised inside text like any special token.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        for idx, entry in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
            entry = entry if isinstance(entry, dict) else {"content": str(entry)}
            if entry["content"] in present:
                continue
            backend.add_tokens([tokenizers.AddedToken(entry["content"], **{k: entry[k] for k in flags if k in entry})])
            got = backend.token_to_id(entry["content"])
            if got != int(idx):
                raise UserError(f"{config_path}: added token {entry['content']!r} has id {idx} but tokenizer.json "
                                f"gives it {got}: the two files come from different checkpoints")
            present.add(entry["content"])
        for token in special:
            if token not in present:
                backend.add_tokens([tokenizers.AddedToken(token, special=True)])
                present.add(token)

    def save_pretrained(self, folder: str):
        """tokenizer.json, tokenizer_config.json (with the chat template in use) and the stop ids in
        generation_config.json (added when that file, e.g. the model's, does not set them)."""
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        config = {k: v for k, v in self.config.items()
                  if k not in _SPECIAL_TOKEN_KEYS and not (k.endswith("_token") and isinstance(v, (str, dict)))}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self.special_tokens)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        template = self._template(required=False)
        if template is not None:
            config["chat_template"] = template
            if os.path.isfile(os.path.join(folder, "chat_template.jinja")):  # would win over the config
                with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
                    f.write(template)
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        gen_path = os.path.join(folder, "generation_config.json")
        gen = _read_json(gen_path) or {}
        if self.eos_token_ids and gen.get("eos_token_id") is None:
            ids = self.eos_token_ids
            gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
            if gen.get("pad_token_id") is None:
                gen["pad_token_id"] = self.pad_token_id
            with open(gen_path, "w", encoding="utf-8") as f:
                json.dump(gen, f, indent=2)

    # -------------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list:
        """Token ids of `text`; no BOS/EOS added, special-token text inside it becomes that token."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # tensor / array
            ids = ids.tolist()
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def token_to_id(self, token: str):
        """The id of one token (None when the vocabulary lacks it)."""
        return self.backend.token_to_id(token)

    def __len__(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self):
        return f"Tokenizer({self.source!r}, {len(self)} tokens, eos={self.eos_token_ids})"

    @property
    def bos_token(self):
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self):
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self):
        return self.special_tokens.get("pad_token")

    @property
    def pad_token_id(self) -> int:
        """The pad token's id, else the first stop id (what generation pads finished rows with)."""
        if self.pad_token is not None:
            return self.token_to_id(self.pad_token)
        if self.eos_token_ids:
            return self.eos_token_ids[0]
        raise UserError(f"{self.source}: no pad_token and no eos token; set pad_token in tokenizer_config.json")

    def check_fits(self, num_embeddings: int, where: str = ""):
        """Raise when this tokenizer can produce ids the model has no embedding row for.
        (Qwen's embedding has more rows than tokens, 151936 vs 151665: that fits.)"""
        n = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        if n > num_embeddings:
            name = os.path.join(self.source, "tokenizer.json") if os.path.isdir(self.source) else self.source
            model = f"the model {where}" if where else "the model"
            raise UserError(f"tokenizer {name} has {n} tokens but {model} has {num_embeddings} embedding rows: "
                            "use the tokenizer of the same checkpoint")

    # -------------------------------------------------------------- chat
    def _builtin_format(self):
        for fmt in _BUILTIN_FORMATS:
            if all(self.backend.token_to_id(t) is not None for t in fmt[2]):
                return fmt
        return None

    def _template(self, required: bool = True):
        if self.chat_template is not None:
            return self.chat_template
        builtin = self._builtin_format()
        if builtin is None and required:
            raise UserError(f"{self.source}: no chat_template in tokenizer_config.json and the vocabulary has neither "
                            "ChatML (<|im_start|>, <|im_end|>) nor Llama-3 (<|start_header_id|>) tokens; "
                            "add a chat_template to tokenizer_config.json")
        return None if builtin is None else builtin[0]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            **template_vars):
        """The prompt for `messages` ([{"role", "content"}, ...]) as transformers'
        `apply_chat_template` makes it: ids (tokenize=True) or the rendered text. Extra keyword
        arguments are template variables (e.g. date_string for Llama-3.1)."""
        import jinja2
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("apply_chat_template: messages must be a non-empty list of {'role', 'content'} dicts")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"apply_chat_template: message {i} must be a dict with 'role' and 'content', "
                                 f"got {m!r}")
            chat.append({k: _plain(v) for k, v in m.items() if v is not None})  # None keys dropped, as there
        variables = {"tools": None, "documents": None, **self.special_tokens, **_plain(template_vars),
                     "messages": chat, "add_generation_prompt": bool(add_generation_prompt)}
        try:
            text = _compile_chat_template(self._template()).render(**variables)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"chat template of {self.source}: {e}") from None
        return self.encode(text) if tokenize else text

    # -------------------------------------------------------------- a fresh vocabulary
    @classmethod
    def train(cls, texts, vocab_size: int = 8192, kind: str = "wordlevel", chat_format: str = "chatml",
              min_frequency: int = 0) -> "Tokenizer":
        """A new tokenizer for an LLM trained from scratch (the synthetic-language demo).

        kind="wordlevel": one id per word or punctuation run (whitespace separates), so every
        word and UPPERCASE gloss is a single token; decode joins with single spaces, so
        "am montag gibt es nebel ." round-trips; unseen words become <|unk|>.
        kind="bpe": byte-level BPE with Qwen2's pre-tokenizer (any text encodes, nothing is unknown).
        Special tokens <|endoftext|> (also the pad), <|im_start|>, <|im_end|> (+ <|unk|>); stop ids
        [<|im_end|>, <|endoftext|>] as Qwen2.5-Instruct; prompts in ChatML, saved as the template.
        """
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
        if chat_format != "chatml":
            raise UserError(f"Tokenizer.train: chat_format must be 'chatml', got {chat_format!r}")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        if kind == "wordlevel":
            specials.append("<|unk|>")
            backend = tokenizers.Tokenizer(models.WordLevel(unk_token="<|unk|>"))
            backend.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_SPLIT), behavior="removed", invert=True)
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                special_tokens=specials, show_progress=False)
        elif kind == "bpe":
            backend = tokenizers.Tokenizer(models.BPE())
            backend.normalizer = normalizers.NFC()
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            backend.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        else:
            raise UserError(f"Tokenizer.train: kind must be 'wordlevel' or 'bpe', got {kind!r}")
        seen = [0]

        def corpus():
            for text in texts:
                seen[0] += 1
                yield text
            yield "system user assistant"  # the role names ChatML writes are words of every prompt

        backend.train_from_iterator(corpus(), trainer=trainer)
        if seen[0] == 0:
            raise UserError("Tokenizer.train: the corpus is empty")
        eos = [backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")]
        special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|unk|>" if kind == "wordlevel" else None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "bos_token": None}
        return cls(backend, special, CHATML_TEMPLATE, eos, config, source=f"Tokenizer.train({kind})")
