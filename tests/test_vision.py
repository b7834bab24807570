"""Tests for vision.py (paper section 3.2): DINOv2 and mBART against tiny random transformers
models built here, saved with save_pretrained and loaded by our code; then the behaviour of
the hierarchical encoder and of the VCP model."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LoRALinear, lora_parameters
from vision import (HierarchicalConfig, HierarchicalEncoder, TextEncoder, TextEncoderConfig, VCPConfig,
                    VCPModel, ViT, ViTConfig, local_attention_mask)

import transformers  # a test dependency (requirements-dev.txt): missing, the parity tests must fail, not skip


def randomize(module, std=0.2, seed=0):
    """Larger-than-init random weights, so a wrong term shows up well above float noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)  # LayerNorm gains near 1
            else:
                p.copy_(std * noise)
    return module


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ============================================================================ ViT (DINOv2)

DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16)


def hf_dino(tmp_path, kind):
    if kind == "plain":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**DINO))
    elif kind == "registers":
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**DINO, num_register_tokens=3))
    elif kind == "swiglu":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**DINO, use_swiglu_ffn=True))
    else:  # a model with a head: keys saved as dinov2.*
        model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**DINO, num_labels=3))
    randomize(model).eval()
    folder = str(tmp_path / kind)
    model.save_pretrained(folder)
    return (model.dinov2 if kind == "head" else model), folder


@pytest.mark.parametrize("kind", ["plain", "registers", "swiglu", "head"])
def test_dinov2_matches_transformers_at_any_size(tmp_path, kind):
    torch.manual_seed(0)
    ref, folder = hf_dino(tmp_path, kind)
    vit = ViT.from_pretrained(folder)
    if kind == "registers":
        assert vit.config.num_register_tokens == 3 and vit.num_prefix_tokens == 4
    # the checkpoint's 16 px (no interpolation), larger, smaller and non-square (interpolated)
    for H, W in [(16, 16), (24, 24), (8, 8), (12, 20)]:
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            want = ref(pixel_values=x).last_hidden_state
            cls = vit(x)
            tokens = vit(x, all_tokens=True)
        assert cls.shape == (2, 32) and tokens.shape == want.shape
        assert max_diff(cls, want[:, 0]) < 1e-4, (H, W)
        assert max_diff(tokens, want) < 1e-4, (H, W)


def test_dinov2_interpolation_really_resizes(tmp_path):
    # guards the test above: at another size the position grid must differ from the stored one
    _, folder = hf_dino(tmp_path, "plain")
    vit = ViT.from_pretrained(folder)
    emb = vit.embeddings
    assert emb.position_embedding(16, 16, 16) is emb.position_embeddings
    resized = emb.position_embedding(36, 24, 24)
    assert resized.shape == (1, 37, 32)
    assert torch.equal(resized[:, 0], emb.position_embeddings[:, 0])  # CLS position kept


def rewrite(path, edit):
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("encoder.layer.0.norm1.weight"), "missing encoder.layer.0.norm1.weight"),
    (lambda sd: sd.update({"encoder.layer.0.extra.weight": torch.zeros(1)}),
     "unexpected encoder.layer.0.extra.weight"),
    (lambda sd: sd.update({"layernorm.bias": torch.zeros(7)}), "layernorm.bias has shape (7,)"),
])
def test_dinov2_bad_checkpoint_raises_one_line(tmp_path, edit, message):
    _, folder = hf_dino(tmp_path, "plain")
    path = os.path.join(folder, "model.safetensors")
    rewrite(path, edit)
    with pytest.raises((KeyError, ValueError)) as err:  # KeyError: missing/unexpected, ValueError: shape
        ViT.from_pretrained(folder)
    text = str(err.value)
    assert message in text and "model.safetensors" in text and "\n" not in text


def test_vit_chunks_and_checkpointing_change_nothing():
    torch.manual_seed(0)
    vit = randomize(ViT(ViTConfig(**DINO)))
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(vit(x, chunk_size=2), vit(x, chunk_size=100)) < 1e-5  # GEMM blocking differs with batch
    grads = []
    for ckpt in (False, True):
        vit.zero_grad()
        vit.grad_checkpointing = ckpt
        vit.train()
        vit(x, chunk_size=2).square().sum().backward()
        grads.append(vit.embeddings.patch_embeddings.projection.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and max_diff(grads[0], grads[1]) < 1e-5
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        vit(torch.randn(1, 3, 15, 16))


def test_lora_with_zero_b_changes_nothing():
    torch.manual_seed(0)
    vit = randomize(ViT(ViTConfig(**DINO)))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = vit(x)
        wrapped = vit.add_lora(r=2, alpha=4)
        after = vit(x)
    assert wrapped == [f"encoder.layer.{i}.attention.attention.{n}" for i in range(2) for n in ("query", "value")]
    assert isinstance(vit.encoder.layer[0].attention.attention.query, LoRALinear)
    assert torch.equal(before, after)


# ============================================================================ text encoder (mBART)

WORDS = "der die das regen wind sonne morgen heute nord sued ost west wolken schnee".split()
MBART = dict(vocab_size=24, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=20,
             scale_embedding=True, pad_token_id=1, dropout=0.0)


def write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["de_DE", "zh_CN"])  # ids 18, 19
    tok.save(os.path.join(folder, "tokenizer.json"))


def hf_mbart(folder, generation=False, seed=0):
    torch.manual_seed(seed)
    cls = transformers.MBartForConditionalGeneration if generation else transformers.MBartModel
    model = randomize(cls(transformers.MBartConfig(**MBART)), seed=seed).eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model.get_encoder()


TEXTS = ["regen und wind morgen im nord", "sonne", "heute schnee ost west wolken"]


@pytest.mark.parametrize("generation", [False, True])
def test_mbart_encoder_matches_transformers(tmp_path, generation):
    folder = str(tmp_path / "mbart")
    ref = hf_mbart(folder, generation)
    if generation:  # MBartForConditionalGeneration writes model.shared / model.encoder.* and lm head extras
        assert "model.shared.weight" in load_file(os.path.join(folder, "model.safetensors"))
    enc = TextEncoder.from_pretrained(folder)
    ids, mask = enc.tokenize(TEXTS, lang="de_DE")
    assert ids.shape == (3, 8) and mask.sum(1).tolist() == [8, 3, 7]
    assert ids[1].tolist() == [WORDS.index("sonne") + 4, 2, 18, 1, 1, 1, 1, 1]  # tokens </s> de_DE, pad 1
    assert ids[0, 1].item() == 3  # "und" is unknown
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = enc(ids, mask)
    assert max_diff(got[mask], want[mask]) < 1e-4
    # each sentence alone (no padding) gives the same states
    with torch.no_grad():
        alone = enc(ids[1:2, :3], mask[1:2, :3])
    assert max_diff(alone[0], got[1, :3]) < 1e-5


def test_sentence_embedding_is_the_language_code_state(tmp_path):
    folder = str(tmp_path / "mbart")
    hf_mbart(folder)
    enc = TextEncoder.from_pretrained(folder)
    ids, mask = enc.tokenize(TEXTS, lang="zh_CN")
    with torch.no_grad():
        states, sent = enc(ids, mask), enc.sentence_embedding(ids, mask)
    last = mask.sum(1) - 1
    assert ids[torch.arange(3), last].tolist() == [19, 19, 19]
    for b in range(3):
        assert torch.equal(sent[b], states[b, last[b]])
    enc.config.pool = "mean"
    with torch.no_grad():
        mean = enc.sentence_embedding(ids, mask)
    assert max_diff(mean[1], states[1, :3].mean(0)) < 1e-6
    with pytest.raises(ValueError, match="no language code 'xx_XX'"):
        enc.tokenize(["regen"], lang="xx_XX")
    with pytest.raises(ValueError, match="text 1 is empty"):
        enc.tokenize(["regen", " "])


def test_mbart_missing_encoder_key_raises_decoder_ignored(tmp_path):
    folder = str(tmp_path / "mbart")
    hf_mbart(folder, generation=True)
    path = os.path.join(folder, "model.safetensors")
    rewrite(path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.decoder.layers.0.")])
    TextEncoder.from_pretrained(folder)  # decoder keys are not ours to check
    rewrite(path, lambda sd: sd.pop("model.encoder.layers.1.fc2.bias"))
    with pytest.raises(KeyError) as err:
        TextEncoder.from_pretrained(folder)
    assert "missing layers.1.fc2.bias" in str(err.value) and "\n" not in str(err.value)


def test_mbart_sharded_checkpoint_loads(tmp_path):
    hf_mbart(str(tmp_path / "one"))
    full = transformers.MBartModel.from_pretrained(str(tmp_path / "one"))
    full.save_pretrained(str(tmp_path / "shards"), max_shard_size="20KB")
    write_tokenizer(str(tmp_path / "shards"))
    assert os.path.exists(tmp_path / "shards" / "model.safetensors.index.json")
    one = TextEncoder.from_pretrained(str(tmp_path / "one"))
    shards = TextEncoder.from_pretrained(str(tmp_path / "shards"))
    ids, mask = one.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(one(ids, mask), shards(ids, mask))


def test_text_encoder_save_pretrained_round_trip(tmp_path):
    folder = str(tmp_path / "mbart")
    hf_mbart(folder)
    enc = TextEncoder.from_pretrained(folder)
    enc.save_pretrained(str(tmp_path / "ours"))
    again = TextEncoder.from_pretrained(str(tmp_path / "ours"))
    ids, mask = enc.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(enc(ids, mask), again(ids, mask))


# ============================================================================ hierarchical encoder

def hier(**kw):
    torch.manual_seed(0)
    config = HierarchicalConfig(**{**dict(input_dim=8, dim=16, heads=2, local_layers=1, window=2, step=4,
                                       full_layers=1, dropout=0.0), **kw})
    return HierarchicalEncoder(config).eval()


def test_local_window_limits_what_a_word_sees():
    enc = hier(window=3)
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        words, _, _, _ = enc(x)
        outside, inside = x.clone(), x.clone()
        outside[0, 4] += 1.0  # word 0 is frame 0, which sees frames 0..3
        inside[0, 3] += 1.0
        w_out, _, _, _ = enc(outside)
        w_in, _, _, _ = enc(inside)
    assert words.shape == (1, 4, 16)
    assert max_diff(w_out[0, 0], words[0, 0]) < 1e-6
    assert max_diff(w_in[0, 0], words[0, 0]) > 1e-3
    assert max_diff(w_out[0, 1], words[0, 1]) > 1e-3  # word 1 is frame 4 itself


def test_mask_always_lets_a_frame_see_itself():
    m = local_attention_mask(torch.tensor([[True, True, False, False]]), window=1)[0, 0]
    # padded frame 2 still sees valid frame 1 (harmless: its output is masked later);
    # padded frame 3 has no valid frame in its band and sees only itself instead of nothing
    assert m.tolist() == [[True, True, False, False], [True, True, False, False],
                          [False, True, True, False], [False, False, False, True]]


def test_time_reversal_changes_word_features():
    x = torch.randn(2, 12, 8)
    for rope in (True, False):
        enc = hier(rope=rope, step=1, window=4)
        with torch.no_grad():
            words, _, _, _ = enc(x)
            rev, _, _, _ = enc(x.flip(1))
        # without positions the banded attention is reversal-equivariant: the control case
        diff = max_diff(rev.flip(1), words)
        assert (diff > 1e-2) if rope else (diff < 1e-5), (rope, diff)


def test_padded_batch_equals_each_clip_alone():
    enc = hier(local_layers=2, full_layers=2)
    lengths = [1, 2, 5, 13]
    clips = [torch.randn(n, 8) for n in lengths]
    x = torch.zeros(4, 13, 8)
    mask = torch.zeros(4, 13, dtype=torch.bool)
    for b, c in enumerate(clips):
        x[b, :len(c)], mask[b, :len(c)] = c, True
    with torch.no_grad():
        words, word_mask, sent, _ = enc(x, mask)
    assert torch.isfinite(words).all() and torch.isfinite(sent).all()
    assert word_mask.sum(1).tolist() == [math.ceil(n / 4) for n in lengths]
    for b, c in enumerate(clips):
        with torch.no_grad():
            w, m, s, _ = enc(c[None])
        n = math.ceil(len(c) / 4)
        assert m.all() and w.shape[1] == n
        assert max_diff(words[b, :n], w[0]) < 1e-5
        assert max_diff(sent[b], s[0]) < 1e-5


def test_downsample_takes_every_step_th_frame_and_ablations():
    x = torch.randn(2, 13, 8)
    enc1, enc4 = hier(step=1), hier(step=4)
    enc4.load_state_dict(enc1.state_dict())
    with torch.no_grad():
        w1, _, _, _ = enc1(x)
        w4, m4, _, _ = enc4(x)
    assert w4.shape == (2, 4, 16) and m4.shape == (2, 4)
    assert torch.equal(w4, w1[:, [0, 4, 8, 12]])
    # Tab. 7 row 1: no local-attention transformer, frames straight into the full one
    for enc in (hier(use_local=False), hier(local_layers=0)):
        assert enc.local is None
        with torch.no_grad():
            w, _, s, _ = enc(x)
        assert torch.equal(w, enc.input_proj(x)[:, ::4]) and torch.isfinite(s).all()


# ============================================================================ VCP model

def tiny_vcp(text_encoder=None, **kw):
    torch.manual_seed(0)
    config = VCPConfig(vit=ViTConfig(**DINO), image_size=16, lora_r=2, lora_alpha=4,
                    hier=HierarchicalConfig(dim=16, heads=2, local_layers=1, window=2, full_layers=1, dropout=0.0),
                    clip_dim=12, **kw)
    return VCPModel(config, text_encoder)


def video_batch(lengths=(5, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    frames = torch.randn(len(lengths), T, 3, 16, 16, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return frames, mask


def test_vcp_lora_gradients_reach_only_adapters(tmp_path):
    folder = str(tmp_path / "mbart")
    hf_mbart(folder)
    model = tiny_vcp(TextEncoder.from_pretrained(folder)).train()
    assert model.config.text_dim == 32 and model.config.hier.input_dim == 32
    assert not model.text_encoder.training
    frames, mask = video_batch()
    ids, tmask = model.text_encoder.tokenize(["regen wind", "sonne"])
    out = model(frames, mask, ids, tmask)
    assert out["video_emb"].shape == (2, 12) and out["text_emb"].shape == (2, 12)
    assert out["word_features"].shape == (2, 2, 16) and out["word_mask"].tolist() == [[True, True], [True, False]]
    assert abs(out["logit_scale"].item() - 1 / 0.07) < 1e-3
    assert torch.equal(out["frame_features"][1, 3:], torch.zeros(2, 32))  # padding never ran through the ViT
    (out["video_emb"] * out["text_emb"]).sum().backward()
    vit_grads = {n for n, p in model.vit.named_parameters() if p.grad is not None}
    assert vit_grads == set(lora_parameters(model.vit))
    assert all(model.vit.get_parameter(n).grad.abs().sum() > 0 for n in vit_grads if ".lora_B." in n)
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert model.text_proj.weight.grad.abs().sum() > 0 and model.hier.query.grad.abs().sum() > 0


def test_vcp_logit_scale_is_clamped_with_a_fresh_text_encoder():
    # a from-scratch text encoder (the demo's kind): no folder, mean pooling
    enc = TextEncoder(TextEncoderConfig(vocab_size=24, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                        encoder_ffn_dim=32, max_position_embeddings=8, pool="mean"))
    model = tiny_vcp(enc, logit_scale_init=1000.0)
    assert model.config.text_dim == 16 and model.config.text_encoder_path == ""
    frames, mask = video_batch()
    ids = torch.tensor([[5, 6, 2], [7, 2, 1]])
    out = model(frames, mask, ids, ids != 1)
    assert out["logit_scale"].item() == pytest.approx(100.0)  # exp(log 1000) clamped to 100
    assert out["text_emb"].shape == (2, 12) and torch.isfinite(out["text_emb"]).all()
    model.text_encoder = None
    with pytest.raises(ValueError, match="no text encoder"):
        model(frames, mask, ids, ids != 1)


def test_vcp_save_load_round_trip(tmp_path):
    folder = str(tmp_path / "mbart")
    hf_mbart(folder)
    model = tiny_vcp(TextEncoder.from_pretrained(folder)).eval()
    for part in (model.vit, model.hier, model.video_proj, model.text_proj):  # LoRA B non-zero too
        randomize(part, std=0.1)
    model.save(str(tmp_path / "vcp"))
    assert not any(k.startswith("text_encoder.") for k in load_file(str(tmp_path / "vcp" / "model.safetensors")))
    again = VCPModel.load(str(tmp_path / "vcp"), with_text_encoder=True).eval()
    assert again.config == model.config
    frames, mask = video_batch()
    ids, tmask = model.text_encoder.tokenize(["regen wind", "sonne"])
    with torch.no_grad():
        a, b = model(frames, mask, ids, tmask), again(frames, mask, ids, tmask)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the video side alone needs no text encoder
    video_only = VCPModel.load(str(tmp_path / "vcp"))
    with torch.no_grad():
        assert torch.equal(video_only.eval().encode_video(frames, mask)["word_features"], a["word_features"])
    # strict: a missing key is one line naming it
    path = str(tmp_path / "vcp" / "model.safetensors")
    rewrite(path, lambda sd: sd.pop("hier.query"))
    with pytest.raises(KeyError, match="missing hier.query"):
        VCPModel.load(str(tmp_path / "vcp"))


def test_vcp_from_dinov2_folder_and_flat_frame_pool(tmp_path):
    ref, folder = hf_dino(tmp_path, "plain")
    model = tiny_vcp(vit_path=folder, vit_tuning="full", frame_pool="flat").eval()
    frames, mask = video_batch()
    with torch.no_grad():
        out = model.encode_video(frames, mask)
        tokens = ref(pixel_values=frames[0, :5]).last_hidden_state[:, 1:]  # (5, 16, 32) patch tokens
        want = model.frame_proj(tokens.flatten(1))
    assert model.frame_proj.in_features == 16 * 32
    assert max_diff(out["frame_features"][0], want) < 1e-4
    assert torch.isfinite(out["video_emb"]).all()
    with pytest.raises(ValueError, match="image_size 16"):
        model.encode_video(torch.randn(1, 2, 3, 20, 20))


def test_sentence_features_are_the_penultimate_full_layer_and_see_the_whole_clip():
    """Tab. 8 row 1: one token per word position, from the full-attention transformer's
    penultimate layer, so each sees the whole clip where a word feature sees its window."""
    enc = hier(window=3, full_layers=2)
    x = torch.randn(1, 16, 8)
    seen = []
    enc.full.layers[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # returns None
    with torch.no_grad():
        words, mask, _, feats = enc(x)
        far = x.clone()
        far[0, 15] += 1.0                      # outside word 0's window
        w2, _, _, f2 = enc(far)
    assert feats.shape == words.shape == (1, 4, 16) and torch.equal(feats, seen[0][:, 1:])
    assert max_diff(w2[0, 0], words[0, 0]) < 1e-6 and max_diff(f2[0, 0], feats[0, 0]) > 1e-4


def test_an_llm_as_text_supervisor_is_the_mean_of_its_last_hidden_states(tmp_path):
    """Tab. 7 row 6 (Qwen-2.5-0.5B as VCP's text supervisor), on a tiny random Qwen2 built and
    saved by transformers: our sentence embedding equals the masked mean of its last_hidden_state."""
    from tokenizer import Tokenizer
    from vision import LLMTextEncoder, load_text_encoder
    tok = Tokenizer.train(["am montag regnet es im norden", "morgen gibt es viel sonne im süden"], kind="wordlevel")
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    randomize(hf)
    hf.eval().save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(str(tmp_path))
    enc = load_text_encoder(str(tmp_path))
    assert isinstance(enc, LLMTextEncoder) and enc.config.d_model == 32
    ids, mask = enc.tokenize(["am montag regnet es im norden", "morgen sonne"])
    assert mask.sum(1).tolist() == [6, 2]
    with torch.no_grad():
        ours = enc.sentence_embedding(ids, mask)
        states = hf.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
        ref = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert max_diff(ours[0], ours[1]) > 1e-2


def test_checkpointing_keeps_no_layer_activations_per_frame():
    """With grad_checkpointing a chunk of frames keeps nothing for the backward pass but what
    leaves it; without, every layer's activations per frame (the slope over frames)."""
    from bench import activation_estimate, kept_bytes
    torch.manual_seed(0)
    vit = randomize(ViT(ViTConfig(**DINO))).train()
    x = torch.randn(4, 3, 16, 16)
    slopes = {}
    for ckpt in (False, True):
        vit.grad_checkpointing = ckpt
        slopes[ckpt] = (kept_bytes(lambda: vit(x, chunk_size=4)) - kept_bytes(lambda: vit(x[:2], chunk_size=4))) / 2
    assert slopes[False] > 10_000 and slopes[True] == 0, slopes
    config = VCPConfig(vit=ViTConfig(**DINO), vit_path="", image_size=16, resize=16, vit_tuning="lora",
                    grad_checkpointing=True, vit_chunk_size=8, hier=HierarchicalConfig(dim=16, heads=2))
    est = activation_estimate(VCPModel(config, None), 100, "cpu", "fp32")
    frame = 3 * 16 * 16 * 4
    assert est["mib_per_frame"] == 0 and est["full_mib_per_frame"] * 2**20 > 10_000
    assert est["gib"] * 2**30 == pytest.approx(100 * frame + 8 * est["full_mib_per_frame"] * 2**20, rel=1e-9)


def test_hierarchical_rope_against_a_complex_number_reference():
    """RoPE of the hierarchical encoder, checked against its definition written independently:
    feature pair (j, j + d/2) of position p is the complex number x_j + i x_{j+d/2}, turned by
    the angle p * theta^(-2j/d) (the rotate-half layout of Llama / Qwen)."""
    from vision import _apply_rope, _rope
    n, d, theta = 7, 8, 10000.0
    x = torch.randn(2, 3, n, d, dtype=torch.float64)
    cos, sin = _rope(n, d, theta, "cpu")
    got = _apply_rope(x, cos.double(), sin.double())
    z = torch.complex(x[..., :d // 2], x[..., d // 2:])                      # (B, h, n, d/2)
    angle = torch.tensor([[p * theta ** (-2 * j / d) for j in range(d // 2)] for p in range(n)],
                         dtype=torch.float64)                                  # (n, d/2)
    turned = z * torch.polar(torch.ones_like(angle), angle)
    ref = torch.cat([turned.real, turned.imag], dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)               # fp32 angles inside _rope
    # relative: the attention score between positions p and q depends on p - q only
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rq, rk = (_apply_rope(v.expand(1, 1, n, d), cos.double(), sin.double())[0, 0] for v in (q, k))
    assert torch.allclose(rq[3] @ rk[1], rq[5] @ rk[3]) and not torch.allclose(rq[3] @ rk[1], rq[3] @ rk[2])
