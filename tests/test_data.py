"""Tests for data.py: sampling, transforms, clip batches, prompts, chat examples, packed blocks."""

import json

import numpy as np
import pytest
import torch

import data
from losses import IGNORE_INDEX
from tokenizer import Tokenizer
from data import (IMAGENET_MEAN, IMAGENET_STD, ClipAugment, ClipDataset, VideoTransform, collate_clips,
                  sample_indices, system_prompt)
from test_readers import COLOURS, colour_clip, write_frames, write_mp4  # noqa: F401


# ---------------------------------------------------------------------------- sampling

def test_sample_indices_eval_and_stride():
    assert sample_indices(100, 10).tolist() == list(range(5, 100, 10))  # segment centres
    assert sample_indices(7, 10).tolist() == list(range(7))  # short clips are kept whole
    assert sample_indices(10, None, stride=3).tolist() == [0, 3, 6, 9]
    assert sample_indices(40, 5, stride=2).tolist() == [4, 12, 20, 28, 36]  # stride first, then centres
    assert sample_indices(11, 10).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_sample_indices_train_random_within_segments():
    draws = [sample_indices(100, 10, train=True, rng=np.random.default_rng(s)) for s in range(20)]
    for idx in draws:
        assert ((idx // 10) == np.arange(10)).all()  # one frame inside each segment of 10
    assert len({tuple(d) for d in draws}) == 20
    again = sample_indices(100, 10, train=True, rng=np.random.default_rng(3))
    assert again.tolist() == draws[3].tolist()
    for s in range(10):  # 5 of 7 frames: segments [0,1) [1,2) [2,4) [4,5) [5,7)
        idx = sample_indices(7, 5, train=True, rng=np.random.default_rng(s))
        assert idx[:2].tolist() == [0, 1] and idx[2] in (2, 3) and idx[3] == 4 and idx[4] in (5, 6)
    phases = {int(sample_indices(30, None, stride=3, train=True, rng=np.random.default_rng(s))[0])
              for s in range(20)}
    assert phases == {0, 1, 2}  # random stride phase in training


# ---------------------------------------------------------------------------- transforms

def _pixels(out):  # normalised (T, 3, H, W) -> 0..255 values
    return (out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255


def test_transform_normalisation_values():
    clip = np.broadcast_to(np.array([255, 0, 128], np.uint8), (3, 10, 14, 3)).copy()
    out = VideoTransform(size=8, resize=12)(clip)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 8, 8)
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_transform_eval_centre_square_and_crop():
    # value = column index; a 40x48 frame keeps columns 4..43 as its centre square
    clip = np.broadcast_to(np.arange(48, dtype=np.uint8)[None, None, :, None], (2, 40, 48, 3)).copy()
    out = VideoTransform(size=40, resize=40)(clip)
    torch.testing.assert_close(_pixels(out)[0, 0, 0], torch.arange(4, 44).float(), atol=1e-3, rtol=0)
    out = VideoTransform(size=20, resize=40)(clip)  # centre crop: columns 10..29 of the square
    torch.testing.assert_close(_pixels(out)[1, 2, 5], torch.arange(14, 34).float(), atol=1e-3, rtol=0)
    assert torch.equal(VideoTransform(size=20, resize=40)(clip), out)  # eval: no randomness


def test_transform_train_same_draw_for_every_frame():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, 30, 36, 3), dtype=np.uint8)
    clip = np.repeat(frame, 5, axis=0)
    tf = VideoTransform(size=16, resize=24, train=True, color_jitter=0.4, rotation=10.0, flip_p=0.5)
    out = tf(clip, np.random.default_rng(1))
    for t in range(1, 5):
        assert torch.equal(out[t], out[0])
    assert torch.equal(tf(clip, np.random.default_rng(1)), out)  # same seed, same draw
    assert not torch.equal(tf(clip, np.random.default_rng(2)), out)
    # one pixel map for the whole clip: reversing the frames reverses the output, nothing else
    two = rng.integers(0, 256, (2, 30, 36, 3), dtype=np.uint8)
    a, b = tf(two, np.random.default_rng(5)), tf(two[::-1].copy(), np.random.default_rng(5))
    torch.testing.assert_close(a, b.flip(0), atol=1e-6, rtol=0)


def test_transform_train_augments_values():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    tf = VideoTransform(size=16, resize=24, train=True)
    base = _pixels(tf(clip, augment=ClipAugment(top=3, left=5)))
    torch.testing.assert_close(base, torch.from_numpy(clip[:, 3:19, 5:21]).permute(0, 3, 1, 2).float(),
                               atol=1e-3, rtol=0)  # crop at (top, left), nothing else
    flip = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, flip=True)))
    torch.testing.assert_close(flip, base.flip(-1), atol=1e-3, rtol=0)
    rot = _pixels(tf(clip, augment=ClipAugment(top=4, left=4, angle=90.0)))  # centred square: exact rot90
    ref = torch.from_numpy(clip[:, 4:20, 4:20]).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(rot, torch.rot90(ref, 1, (-2, -1)), atol=1e-2, rtol=0)
    # upsampling 12 -> 24 px: resize, rotation and crop in one resampling of the small frames
    small, up = clip[:, ::2, ::2].copy(), VideoTransform(size=16, resize=24, train=True)
    plain = _pixels(up(small, augment=ClipAugment(top=4, left=4)))  # uint8 resize, then crop
    rot = _pixels(up(small, augment=ClipAugment(top=4, left=4, angle=-90.0)))
    torch.testing.assert_close(rot, torch.rot90(plain, -1, (-2, -1)), atol=1.01, rtol=0)  # uint8 rounding
    rot_flip = _pixels(up(small, augment=ClipAugment(top=4, left=4, angle=-90.0, flip=True)))
    torch.testing.assert_close(rot_flip, rot.flip(-1), atol=1e-3, rtol=0)
    bright = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, brightness=1.5)))
    torch.testing.assert_close(bright, (base * 1.5).clamp(max=255), atol=1e-2, rtol=0)
    sat0 = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, saturation=0.0)))  # grey: channels equal
    torch.testing.assert_close(sat0[:, 0], sat0[:, 1], atol=1e-2, rtol=0)
    con0 = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, contrast=0.0)))  # the clip's mean grey
    grey = (0.299 * base[:, 0] + 0.587 * base[:, 1] + 0.114 * base[:, 2]).mean()
    torch.testing.assert_close(con0, grey.expand_as(con0), atol=1e-2, rtol=0)
    a = tf.sample(np.random.default_rng(0))
    assert 0 <= a.top <= 8 and 0 <= a.left <= 8 and abs(a.angle) <= 5 and 0.8 <= a.brightness <= 1.2


# ---------------------------------------------------------------------------- clip dataset

def test_clip_dataset_and_collate(tmp_path):
    write_frames(tmp_path / "a", range(10, 130, 10), size=(8, 8))  # 12 frames, values 10..120
    write_mp4(tmp_path / "b.mp4", colour_clip(3, 8))
    rows = [{"id": "a", "video": str(tmp_path / "a"), "text": "eins"},
            {"id": "b", "video": str(tmp_path / "b.mp4"), "text": "zwei"}]
    ds = ClipDataset(rows, VideoTransform(size=8, resize=8), max_frames=4)
    batch = collate_clips([ds[0], ds[1]])
    assert batch["ids"] == ["a", "b"] and batch["texts"] == ["eins", "zwei"]
    assert batch["index"].tolist() == [0, 1] and batch["lengths"].tolist() == [4, 3]
    assert batch["frames"].shape == (2, 4, 3, 8, 8)
    assert batch["frame_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert batch["frames"][1, 3].abs().sum() == 0  # zero padding
    # eval picks segment centres 1, 4, 7, 10 of the 12 frames: values 20, 50, 80, 110
    assert _pixels(batch["frames"][0])[:, 0, 0, 0].round().tolist() == [20, 50, 80, 110]
    assert np.abs(_pixels(batch["frames"][1, :3])[:, :, 4, 4].numpy() - COLOURS[:3]).max() < 4

    train = ClipDataset(rows, VideoTransform(size=6, resize=8, train=True), max_frames=4, train=True, seed=1)
    first = train[0]["frames"]
    assert torch.equal(train[0]["frames"], first)  # (seed, epoch, index) fixes the draw
    train.set_epoch(1)
    assert not torch.equal(train[0]["frames"], first)
    train.set_epoch(0)
    assert torch.equal(train[0]["frames"], first)  # resumable
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=1, collate_fn=collate_clips)
    assert torch.equal(next(iter(loader))["frames"][0], first)  # the same in a worker process


def test_system_prompt():
    assert system_prompt("German") == ("You are a helpful assistant. Use your expertise to provide the most "
                                       "precise translation. Answer with one single German sentence.")
    assert system_prompt("Chinese", format=False) == ("You are a helpful assistant. Use your expertise to "
                                                       "provide the most precise translation.")
    assert system_prompt("Chinese", task=False, format=False) == "You are a helpful assistant."


# ---------------------------------------------------------------------------- chat examples

ANSWER = "am montag gibt es nebel stark im westen ."
GLOSS = "MONTAG WEST NEBEL STARK"
QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's chat_template without its tools branch
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
LLAMA31_TEMPLATE = (  # Llama-3.1-Instruct's chat_template without its tools branch
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")


def _texts():
    return [system_prompt("German"), system_prompt("Chinese"), ANSWER, GLOSS, "gute nacht ."]


@pytest.fixture(scope="module")
def wordlevel():
    from tokenizer import Tokenizer
    return Tokenizer.train(_texts(), kind="wordlevel")


@pytest.fixture(scope="module")
def bpe():
    from tokenizer import Tokenizer
    return Tokenizer.train(_texts() * 3, kind="bpe", vocab_size=400)


def _folder_tokenizer(tok, folder, template, **config):
    """tok saved as a Hugging Face folder with another chat template / special tokens."""
    from tokenizer import Tokenizer
    tok.save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=template, **config)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "generation_config.json").unlink()  # stop ids from eos_token alone
    return Tokenizer.from_pretrained(str(folder))


def _supervised(ex):
    return [t for t in ex["labels"] if t != -100]


def test_chat_example_visual_chatml(wordlevel):
    tok, system = wordlevel, system_prompt("German")
    im_end = tok.token_to_id("<|im_end|>")
    ex = data.build_chat_example(tok, system, 4, answer=ANSWER, visual_slot_id=7)
    ids, vs = ex["input_ids"], ex["visual_start"]
    prefix = tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    suffix = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    assert vs == len(prefix) and ex["n_visual"] == 4
    assert ids == prefix + [7] * 4 + suffix + tok.encode(ANSWER) + [im_end]
    assert tok.decode(ids[:vs], skip_special_tokens=False) == (
        "<|im_start|> system You are a helpful assistant . Use your expertise to provide the most precise "
        "translation . Answer with one single German sentence . <|im_end|> <|im_start|> user")
    assert ex["labels"][: len(ids) - len(tok.encode(ANSWER)) - 1] == [-100] * (len(ids) - len(tok.encode(ANSWER)) - 1)
    assert tok.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + " <|im_end|>"
    assert all(l == t for l, t in zip(ex["labels"], ids) if l != -100)  # labels aligned with input_ids
    prompt = data.build_chat_example(tok, system, 4, visual_slot_id=7)  # generation: the same prompt, nothing supervised
    assert prompt["input_ids"] == ids[: len(prefix) + 4 + len(suffix)] and set(prompt["labels"]) == {-100}
    assert data.build_chat_example(tok, system, 4)["input_ids"][vs:vs + 4] == [tok.pad_token_id] * 4


def test_chat_example_gloss_matches_template(wordlevel):
    tok, system = wordlevel, system_prompt("German")
    ex = data.build_chat_example(tok, system, GLOSS, answer=ANSWER)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": GLOSS},
                {"role": "assistant", "content": ANSWER}]
    assert ex["input_ids"] == tok.apply_chat_template(messages)  # whitespace-split words: no boundary effects
    assert ex["visual_start"] is None and ex["n_visual"] == 0
    assert _supervised(ex) == tok.encode(ANSWER) + [tok.token_to_id("<|im_end|>")]
    with pytest.raises(ValueError, match="empty answer"):
        data.build_chat_example(tok, system, GLOSS, answer="  ")


def test_chat_example_bpe_newline_not_supervised(bpe):
    ex = data.build_chat_example(bpe, system_prompt("German"), 2, answer=ANSWER)
    assert bpe.decode(ex["input_ids"], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n" + ANSWER + "<|im_end|>\n")
    assert ex["labels"][-1] == -100 and ex["labels"][-2] == bpe.token_to_id("<|im_end|>")  # "\n" after the end
    assert bpe.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + "<|im_end|>"


def test_chat_example_qwen25_template_folder(bpe, tmp_path):
    tok = _folder_tokenizer(bpe, tmp_path / "qwen", QWEN25_TEMPLATE)
    ex = data.build_chat_example(tok, None, 3, answer=ANSWER)  # no system turn: Qwen's default one
    vs = ex["visual_start"]
    assert tok.decode(ex["input_ids"][:vs], skip_special_tokens=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n")
    assert ex["input_ids"][vs:vs + 3] == [tok.pad_token_id] * 3
    n_answer = len(_supervised(ex))
    assert tok.decode(ex["input_ids"][vs + 3:-n_answer - 1], skip_special_tokens=False) == (
        "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + "<|im_end|>"
    ex = data.build_chat_example(tok, system_prompt("Chinese"), GLOSS, answer=ANSWER)
    assert tok.decode(ex["input_ids"], skip_special_tokens=False).startswith(
        f"<|im_start|>system\n{system_prompt('Chinese')}<|im_end|>\n<|im_start|>user\n{GLOSS}<|im_end|>")
    # a folder whose stop token is not the turn end: an error, not a model that never stops
    bad = _folder_tokenizer(bpe, tmp_path / "bad", QWEN25_TEMPLATE, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"ends with '<\|im_end\|>\\n', which holds none of the tokenizer's eos ids"):
        data.build_chat_example(bad, None, 3, answer=ANSWER)


def test_chat_example_llama31_template_folder(bpe, tmp_path):
    tok = _folder_tokenizer(bpe, tmp_path / "llama", LLAMA31_TEMPLATE, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>",
                            additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    eot = tok.token_to_id("<|eot_id|>")
    assert tok.eos_token_ids == [eot]
    ex = data.build_chat_example(tok, system_prompt("German"), 5, answer=f"  {ANSWER} ")  # the template trims
    vs = ex["visual_start"]
    assert tok.decode(ex["input_ids"][:vs], skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: 26 Jul 2024\n\n{system_prompt('German')}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert tok.decode(ex["input_ids"][vs + 5:], skip_special_tokens=False) == (
        f"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>")
    assert _supervised(ex)[-1] == eot and ex["labels"][-1] == eot
    assert tok.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + "<|eot_id|>"


def test_collate_vlt_padding(wordlevel):
    tok, system = wordlevel, system_prompt("German")
    a = data.build_chat_example(tok, system, 2, answer=ANSWER)
    b = data.build_chat_example(tok, system, 5, answer="gute nacht .")
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert la > lb
    pad = la - lb
    r = data.collate_vlt([a, b], pad_id=99, padding_side="right")
    assert r["input_ids"][0].tolist() == a["input_ids"] and r["input_ids"][1].tolist() == b["input_ids"] + [99] * pad
    assert r["labels"][1].tolist() == b["labels"] + [-100] * pad
    assert r["attention_mask"].tolist() == [[1] * la, [1] * lb + [0] * pad]
    assert r["visual_start"].tolist() == [a["visual_start"], b["visual_start"]] and r["n_visual"].tolist() == [2, 5]
    assert r["slot_mask"][1].nonzero().flatten().tolist() == list(range(b["visual_start"], b["visual_start"] + 5))
    l = data.collate_vlt([a, b], pad_id=99, padding_side="left")
    assert l["input_ids"][1].tolist() == [99] * pad + b["input_ids"]
    assert l["labels"][1].tolist() == [-100] * pad + b["labels"]
    assert l["attention_mask"][1].tolist() == [0] * pad + [1] * lb
    assert l["visual_start"].tolist() == [a["visual_start"], b["visual_start"] + pad]
    assert (l["input_ids"][l["slot_mask"]] == tok.pad_token_id).all() and int(l["slot_mask"].sum()) == 7
    text = data.collate_vlt([data.build_chat_example(tok, system, GLOSS)], pad_id=0)
    assert text["visual_start"].tolist() == [-1] and not text["slot_mask"].any()


def test_pack_blocks(wordlevel):
    tok = wordlevel
    eos = tok.eos_token_ids[0]
    ids = tok.encode(ANSWER) + [eos] + tok.encode("gute nacht .") + [eos]  # 9 + 1 + 3 + 1 = 14 tokens
    blocks = data.pack_blocks(tok, [ANSWER, "gute nacht ."], block_size=4)
    assert blocks.dtype == torch.long and blocks.tolist() == [ids[0:4], ids[4:8], ids[8:12]]  # tail dropped
    assert tok.decode(blocks[2], skip_special_tokens=False) == ". <|im_end|> gute nacht"  # EOS between texts
    assert data.pack_blocks(tok, [ANSWER], block_size=5, eos_id=0)[1].tolist() == tok.encode("stark im westen .") + [0]
    with pytest.raises(ValueError, match="fewer than one block"):
        data.pack_blocks(tok, ["gute nacht ."], block_size=64)


def test_cpt_dataset_supervises_blocks_fully_and_pairs_on_the_answer():
    rows = [{"text": "am montag regnet es im norden ."}, {"text": "morgen gibt es viel sonne ."},
            {"gloss": "MONTAG NORD REGEN", "text": "am montag regnet es im norden ."}]
    tok = Tokenizer.train([r["text"] for r in rows] + ["MONTAG NORD REGEN"], kind="wordlevel")
    ds = data.CorpusDataset(tok, rows, block_size=8, language="German", gloss_repeat=1, seed=0)
    assert len(ds.blocks) == 1 and len(ds.pairs) == 1 and len(ds) == 2
    block = ds[0]
    assert block["labels"] == block["input_ids"] and len(block["input_ids"]) == 8     # every token supervised
    pair = ds[1]
    supervised = [t for t, y in zip(pair["input_ids"], pair["labels"]) if y != IGNORE_INDEX]
    assert [y for y in pair["labels"] if y != IGNORE_INDEX] == supervised
    answer = tok.encode("am montag regnet es im norden .")
    assert supervised[:len(answer)] == answer and len(supervised) == len(answer) + 1   # + the end-of-turn token
    assert tok.decode(supervised[len(answer):], skip_special_tokens=False).strip() in ("<|im_end|>", "<|eot_id|>")
    assert "MONTAG" in tok.decode(pair["input_ids"]) and tok.encode("MONTAG")[0] not in supervised


def test_chat_example_longer_than_the_llm_stops_naming_the_clip(wordlevel):
    tok = wordlevel
    ex = data.build_chat_example(tok, system_prompt("German"), 10, answer=ANSWER)
    n = len(ex["input_ids"])
    assert data.build_chat_example(tok, system_prompt("German"), 10, answer=ANSWER, max_length=n) == ex
    with pytest.raises(data.DataError, match=rf"clip c7: its prompt with 10 visual tokens and its answer is {n} "
                                             rf"tokens, more than the {n - 1} positions"):
        data.build_chat_example(tok, system_prompt("German"), 10, answer=ANSWER, max_length=n - 1, clip="c7")
