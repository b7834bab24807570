"""Tests for model.py, against tiny random transformers models built in the test."""

# ============================================================================ LLM
# Every model here is a tiny random transformers model built in the test, with weights drawn
# far from the defaults (std 0.2, norm weights around 1 +- 0.3) so a wrong norm, RoPE or bias
# shows in the logits. Parity is asserted at 1e-4 in fp32; generation must match token for token.

import json
import os
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import KVCache, LLM, LLMConfig

transformers.logging.set_verbosity_error()

_HF_CONFIGS = {
    # Qwen2.5-style: q/k/v bias, GQA, tied embeddings (as the 0.5B-3B models)
    "qwen2_tied": ("Qwen2Config", dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                       rope_theta=10000.0, max_position_embeddings=256)),
    # Qwen2.5-7B-style: untied head, one KV head for eight query heads
    "qwen2_untied": ("Qwen2Config", dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False,
                                         rope_theta=1000000.0, max_position_embeddings=256)),
    # Qwen1.5-style: plain multi-head attention, sliding window configured but off
    "qwen15": ("Qwen2Config", dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                   rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
                                   max_window_layers=2, max_position_embeddings=256)),
    # Llama-3.1-style: no biases, explicit head_dim != hidden/heads, llama3 frequency scaling that
    # bites at these lengths (original context 16)
    "llama3": ("LlamaConfig", dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=256,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}


def _randomise(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return module


@pytest.fixture(scope="module", params=list(_HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(transformers model, its saved folder, our model loaded from that folder)."""
    cls_name, kwargs = _HF_CONFIGS[request.param]
    config = getattr(transformers, cls_name)(**kwargs)
    hf = _randomise(transformers.AutoModelForCausalLM.from_config(config)).eval()
    folder = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(folder)
    return hf, folder, LLM.from_pretrained(folder)


def _left_padded(vocab, lengths, seed=0):
    """Random prompts of the given lengths, left-padded with token 0: ids, mask (B, max)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _hf_generate(hf, ids, mask, **kw):
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


def _emitted_eos(llm, ids, mask):
    """Two EOS ids the model really emits early (greedy, steps 2 and 4), so rows finish early."""
    free = llm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    return sorted({int(free[0, 2]), int(free[-1, 4])})


@torch.no_grad()
def test_logits_match_transformers(hf_pair):
    hf, _, llm = hf_pair
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(llm(ids), hf(ids).logits, atol=1e-4, rtol=0)
    # Left padding: real positions only, as transformers' generate computes them.
    ids, mask = _left_padded(hf.config.vocab_size, [40, 23, 7])
    ours = llm(ids, attention_mask=mask)
    theirs = hf(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert torch.isfinite(ours).all()
    assert torch.equal(llm.rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    assert (llm.lm_head.weight is llm.model.embed_tokens.weight) == hf.config.tie_word_embeddings


@torch.no_grad()
def test_kv_cache_equals_recomputation(hf_pair):
    _, _, llm = hf_pair
    ids, mask = _left_padded(llm.config.vocab_size, [9, 5], seed=2)
    steps = torch.randint(1, llm.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    cache = KVCache(llm.config, 2, 9 + 6)
    k_ptr = cache.k.data_ptr()
    full_ids, full_mask = ids, mask
    cached = [llm(ids, attention_mask=mask, cache=cache)[:, -1]]
    for t in range(6):
        full_ids = torch.cat([full_ids, steps[:, t:t + 1]], 1)
        full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        cached.append(llm(steps[:, t:t + 1], attention_mask=full_mask, cache=cache)[:, -1])
    assert cache.length == 15 and cache.k.data_ptr() == k_ptr  # written in place, never re-allocated
    recomputed = llm(full_ids, attention_mask=full_mask)[:, 8:]  # positions 8..14 predict the next token
    torch.testing.assert_close(torch.stack(cached, 1), recomputed, atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_matches_transformers(hf_pair):
    hf, _, llm = hf_pair
    ids, mask = _left_padded(hf.config.vocab_size, [11, 6, 3], seed=4)
    eos = _emitted_eos(llm, ids, mask)
    ours = llm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    theirs = _hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ours, theirs)
    assert torch.isin(ours, torch.tensor(eos)).any()  # EOS really occurs


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@torch.no_grad()
def test_beam_search_matches_transformers(hf_pair, length_penalty):
    hf, _, llm = hf_pair
    ids, mask = _left_padded(hf.config.vocab_size, [11, 6, 3], seed=5)
    eos = _emitted_eos(llm, ids, mask)
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=1, num_beams=3, length_penalty=length_penalty)
    ours = llm.generate(ids, attention_mask=mask, **kw)
    theirs = _hf_generate(hf, ids, mask, **kw)
    assert torch.equal(ours, theirs)
    if length_penalty == 1.0:
        assert torch.isin(ours, torch.tensor(eos)).any()  # EOS really occurs


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_batched_generation_equals_one_by_one(hf_pair, num_beams):
    _, _, llm = hf_pair
    lengths = [10, 4, 7]
    ids, mask = _left_padded(llm.config.vocab_size, lengths, seed=6)
    eos = _emitted_eos(llm, ids, mask)
    batched = llm.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos, num_beams=num_beams,
                           pad_token_id=1)
    for i, n in enumerate(lengths):
        alone = llm.generate(ids[i:i + 1, -n:], max_new_tokens=9, eos_token_id=eos, num_beams=num_beams,
                             pad_token_id=1)[0]
        assert torch.equal(batched[i, :len(alone)], alone)
        assert (batched[i, len(alone):] == 1).all()


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(hf_pair):
    _, _, llm = hf_pair
    ids, mask = _left_padded(llm.config.vocab_size, [8, 5], seed=7)
    embeds = llm.embed(ids)
    assert embeds.shape == (2, 8, llm.config.hidden_size)
    assert torch.equal(llm(inputs_embeds=embeds, attention_mask=mask), llm(ids, attention_mask=mask))
    for beams in (1, 2):
        a = llm.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, eos_token_id=[])
        b = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, num_beams=beams,
                         eos_token_id=[])
        assert torch.equal(a, b) and a.shape == (2, 6)


@torch.no_grad()
def test_padding_only_row_gives_no_nan(hf_pair):
    _, _, llm = hf_pair
    ids, mask = _left_padded(llm.config.vocab_size, [6, 6], seed=8)
    mask[1] = 0  # a row that is padding only
    logits = llm(ids, attention_mask=mask)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], llm(ids[:1])[0], atol=1e-5, rtol=0)
    # Right padding (training batches) takes the plain causal path; real tokens are unaffected.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    logits = llm(ids, attention_mask=mask)
    torch.testing.assert_close(logits[1, :3], llm(ids[1:, :3])[0], atol=1e-5, rtol=0)


def _tiny_config(**kw):
    base = dict(model_type="qwen2", vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                bos_token_id=2, eos_token_id=3, dtype="float32")
    base.update(kw)
    return LLMConfig(**base)


@pytest.mark.parametrize("kw", [
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False),
    dict(model_type="llama", attention_bias=False, o_proj_bias=False, head_dim=16,
         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}),
], ids=["qwen2_tied", "qwen2_untied", "llama3"])
@torch.no_grad()
def test_save_loads_in_transformers(tmp_path, kw):
    llm = _randomise(LLM(_tiny_config(**kw))).eval()
    llm.generation_eos_ids = [3, 7]
    ids = torch.randint(0, 80, (2, 30), generator=torch.Generator().manual_seed(9))
    for name, shard_size in (("single", 2**30), ("sharded", 20_000)):
        folder = str(tmp_path / name)
        llm.save_pretrained(folder, max_shard_size=shard_size)
        shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if name == "sharded":
            assert len(shards) > 2 and os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
        else:
            assert shards == ["model.safetensors"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(hf).__name__ == ("LlamaForCausalLM" if kw.get("model_type") == "llama" else "Qwen2ForCausalLM")
        torch.testing.assert_close(hf(ids).logits, llm(ids), atol=1e-4, rtol=0)
        assert list(hf.generation_config.eos_token_id) == [3, 7]
        again = LLM.from_pretrained(folder)
        assert torch.equal(again(ids), llm(ids))
        assert again.generation_eos_ids == [3, 7]
        # generate() without eos_token_id stops on the folder's EOS ids
        prompt = ids[:, :5]
        eos = _emitted_eos(again, prompt, torch.ones_like(prompt))
        again.generation_eos_ids = eos
        assert torch.equal(again.generate(prompt, max_new_tokens=8),
                           again.generate(prompt, max_new_tokens=8, eos_token_id=eos))


def test_save_over_an_earlier_save_and_merge_lora(tmp_path):
    from model import apply_lora
    llm = _randomise(LLM(_tiny_config()))
    llm.save_pretrained(str(tmp_path), max_shard_size=20_000)
    llm.save_pretrained(str(tmp_path))  # the old shards and index must not shadow the new file
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model")) == ["model.safetensors"]
    ids = torch.arange(10)[None]
    base = llm(ids)
    assert torch.equal(LLM.from_pretrained(str(tmp_path))(ids), base)
    apply_lora(llm, ("q_proj", "v_proj"), r=2)
    for n, p in llm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    llm.save_pretrained(str(tmp_path))  # LoRA folded in; the model keeps its adapters
    assert any("lora_A" in n for n, _ in llm.named_parameters())
    merged = LLM.from_pretrained(str(tmp_path))
    torch.testing.assert_close(merged(ids), llm(ids), atol=1e-4, rtol=0)
    assert (merged(ids) - base).abs().max() > 1e-2  # the adapters did change the model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(hf(ids).logits, llm(ids), atol=1e-4, rtol=0)


def test_fp32_master_weights_save_in_the_dtype_asked_and_load_back_exactly(tmp_path):
    llm = _randomise(LLM(_tiny_config()))                  # what full CPT trains: fp32 master weights
    llm.save_pretrained(str(tmp_path), dtype="bfloat16")   # what the user asked for (--dtype=bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = LLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    for (n, p), (m, q) in zip(llm.named_parameters(), back.named_parameters()):
        assert n == m and q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), n
    assert all(p.dtype == torch.float32 for p in llm.parameters())  # the model in memory is unchanged


@torch.no_grad()
def test_load_transformers_sharded_checkpoint_in_bf16(tmp_path):
    _, kwargs = _HF_CONFIGS["qwen2_untied"]
    hf = _randomise(transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**kwargs))).eval()
    hf.generation_config.eos_token_id = [5, 6]
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    llm = LLM.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(llm(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert llm.generation_eos_ids == [5, 6]
    bf16 = LLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    for (name, p), (_, q) in zip(bf16.named_parameters(), llm.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), name
    # bf16 follows transformers' casts (RMSNorm in fp32, cast back before the weight; cos/sin from
    # fp32): the same ops give the same logits here, a cast in a different place is off by > 0.1.
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    logits = bf16(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), hf16(ids).logits.float(), atol=2e-2, rtol=0)


def test_tied_checkpoint_with_lm_head_loads(tmp_path):
    # transformers ignores lm_head.weight in a tied checkpoint; so do we.
    llm = _randomise(LLM(_tiny_config(tie_word_embeddings=True)))
    llm.save_pretrained(str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, path, metadata={"format": "pt"})
    again = LLM.from_pretrained(str(tmp_path))
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.lm_head.weight, llm.model.embed_tokens.weight)


def test_config_spellings():
    old = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0, torch_dtype="bfloat16",
               rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    new.update(dtype="bfloat16", rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192})
    a, b = LLMConfig.from_hf(old), LLMConfig.from_hf(new)
    assert a == b and a.dtype == "bfloat16" and a.head_dim == 4 and a.rope_scaling["rope_type"] == "llama3"
    assert not a.attention_bias and not a.o_proj_bias
    q = LLMConfig.from_hf(dict(new, model_type="qwen2", rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert q.attention_bias and not q.o_proj_bias and q.rope_scaling is None and q.rope_theta == 1e6
    assert LLMConfig.from_hf(q.to_hf()) == q and LLMConfig.from_hf(a.to_hf()) == a
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        LLMConfig.from_hf(dict(new, model_type="mistral"))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        LLMConfig.from_hf(dict(old, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="sliding-window"):
        LLMConfig.from_hf(dict(new, model_type="qwen2", use_sliding_window=True))


def _edit(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_bad_checkpoints_name_file_and_key(tmp_path):
    llm = _randomise(LLM(_tiny_config()))
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    llm.save_pretrained(single)
    llm.save_pretrained(sharded, max_shard_size=20_000)
    path = os.path.join(single, "model.safetensors")

    _edit(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=re.escape(f"checkpoint {path}: missing model.layers.1.mlp.up_proj.weight")):
        LLM.from_pretrained(single)
    llm.save_pretrained(single)
    _edit(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=re.escape(f"checkpoint {path}: unexpected model.layers.2.mlp.up_proj.weight")):
        LLM.from_pretrained(single)
    llm.save_pretrained(single)
    _edit(path, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}: model.norm.weight has shape (31,), "
                                                    "the config expects (32,)")):
        LLM.from_pretrained(single)

    # Sharded: an unexpected key names the shard that holds it, a missing one the index.
    index_path = os.path.join(sharded, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shard = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    index["weight_map"].pop("model.norm.weight")
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(KeyError, match=re.escape(f"checkpoint {os.path.join(sharded, shard)}: unexpected "
                                                 "model.layers.9.mlp.up_proj.weight")):
        LLM.from_pretrained(sharded)
    index["weight_map"].pop("model.layers.9.mlp.up_proj.weight")
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(KeyError, match=re.escape(f"checkpoint {index_path}: missing model.norm.weight")):
        LLM.from_pretrained(sharded)

    os.remove(os.path.join(single, "config.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{single}: no config.json")):
        LLM.from_pretrained(single)
    os.remove(os.path.join(sharded, "model.safetensors.index.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{sharded}: no model.safetensors")):
        LLM.from_pretrained(sharded)


def test_generate_rejects_bad_inputs():
    llm = LLM(_tiny_config())
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate()
    with pytest.raises(ValueError, match="attention_mask"):
        llm.generate(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


# ============================================================================ LoRA / Connector

import json as _json

import pytest as _pytest
import torch as _torch

from model import (Connector, LoRALinear, apply_lora, load_lora, lora_parameters, merge_lora,
                   save_lora)


def _block():
    _torch.manual_seed(0)
    m = _torch.nn.Module()
    m.q_proj, m.k_proj, m.v_proj = (_torch.nn.Linear(16, 12) for _ in range(3))
    return m


def _run(m, x):
    return m.q_proj(x) + m.k_proj(x) + m.v_proj(x)


def test_lora_zero_b_is_identity_and_keeps_base_keys():
    m = _block()
    x = _torch.randn(4, 16)
    before, keys = _run(m, x), set(m.state_dict())
    assert apply_lora(m, ("q_proj", "v_proj"), r=4, alpha=8) == ["q_proj", "v_proj"]
    assert _torch.equal(_run(m, x), before)
    assert keys <= set(m.state_dict())  # base keys unchanged, so base checkpoints still load
    assert isinstance(m.q_proj, LoRALinear) and m.q_proj.scale == 2.0
    assert not isinstance(m.k_proj, LoRALinear)
    assert set(lora_parameters(m)) == {f"{p}.lora_{ab}.weight" for p in ("q_proj", "v_proj") for ab in "AB"}


def test_lora_update_value_and_merge():
    m = _block()
    apply_lora(m, ("q_proj",), r=2, alpha=6)
    _torch.nn.init.normal_(m.q_proj.lora_B.weight, std=0.5)
    x = _torch.randn(5, 16)
    A, B, W, b = m.q_proj.lora_A.weight, m.q_proj.lora_B.weight, m.q_proj.weight, m.q_proj.bias
    expected = x @ W.T + b + (x @ A.T @ B.T) * 3.0
    _torch.testing.assert_close(m.q_proj(x), expected, atol=1e-5, rtol=1e-5)
    unmerged = _run(m, x)
    merge_lora(m)
    assert type(m.q_proj) is _torch.nn.Linear
    _torch.testing.assert_close(_run(m, x), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_gradients_reach_only_adapters_when_base_frozen():
    m = _block()
    for p in m.parameters():
        p.requires_grad_(False)
    apply_lora(m, ("q_proj",), r=2, alpha=4)
    _run(m, _torch.randn(3, 16)).sum().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"q_proj.lora_A.weight", "q_proj.lora_B.weight"}
    assert m.q_proj.lora_B.weight.grad.abs().sum() > 0  # B gets gradient even at zero init


def test_lora_adapters_round_trip(tmp_path):
    m = _block()
    apply_lora(m, ("q_proj", "v_proj"), r=4, alpha=16)
    for p in lora_parameters(m).values():
        _torch.nn.init.normal_(p, std=0.3)
    x = _torch.randn(2, 16)
    save_lora(m, tmp_path)
    adapter_config = _json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 16 and adapter_config["target_modules"] == ["q_proj", "v_proj"]
    fresh = _block()  # same base weights (same seed), no adapters yet
    load_lora(fresh, tmp_path)
    _torch.testing.assert_close(_run(fresh, x), _run(m, x))


def test_lora_adapter_mismatch_names_the_key(tmp_path):
    m = _block()
    apply_lora(m, ("q_proj",), r=4, alpha=8)
    save_lora(m, tmp_path)
    other = _block()
    apply_lora(other, ("q_proj", "v_proj"), r=4, alpha=8)
    with _pytest.raises(KeyError, match="missing v_proj.lora_A.weight"):
        load_lora(other, tmp_path)
    with _pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(_block(), ("o_proj",))


def test_connector_mlp_and_linear():
    _torch.manual_seed(0)
    x = _torch.randn(2, 3, 8)
    mlp, lin = Connector(8, 16, "mlp"), Connector(8, 16, "linear")
    l1, l2 = mlp.proj[0], mlp.proj[2]
    _torch.testing.assert_close(mlp(x), l2(_torch.nn.functional.gelu(l1(x))))
    _torch.testing.assert_close(lin(x), x @ lin.proj.weight.T + lin.proj.bias)
    with _pytest.raises(ValueError, match="'mlp' or 'linear'"):
        Connector(8, 16, "qformer")


# ============================================================================ LLaVASLT

def _llava(visual_dim=6):
    from model import LLM, LLaVASLT, LLMConfig
    _torch.manual_seed(0)
    config = LLMConfig(model_type="qwen2", vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                    tie_word_embeddings=True, eos_token_id=[2], bos_token_id=None, dtype="float32")
    return LLaVASLT(LLM(config), Connector(visual_dim, 16))


def test_llava_splice_puts_visual_tokens_in_the_slots_in_order():
    m = _llava()
    ids = _torch.tensor([[5, 1, 1, 1, 7, 8], [5, 1, 1, 7, 8, 0]])
    slots = ids == 1
    feats = _torch.randn(2, 3, 6)
    mask = _torch.tensor([[True, True, True], [True, True, False]])
    embeds = m.splice(ids, slots, feats, mask)
    projected = m.connector(feats)
    _torch.testing.assert_close(embeds[0, 1:4], projected[0])
    _torch.testing.assert_close(embeds[1, 1:3], projected[1, :2])
    _torch.testing.assert_close(embeds[0, 4:], m.llm.embed(ids)[0, 4:])  # text positions untouched
    with _pytest.raises(ValueError, match="do not match"):
        m.splice(ids, slots, feats, _torch.ones(2, 3, dtype=_torch.bool))


def test_llava_forward_and_generate_from_embeddings_agree():
    m = _llava().eval()
    ids = _torch.tensor([[5, 1, 1, 7, 8]])
    feats, mask = _torch.randn(1, 2, 6), _torch.ones(1, 2, dtype=_torch.bool)
    am = _torch.ones_like(ids)
    logits = m(ids, am, ids == 1, feats, mask)
    new = m.generate(ids, am, ids == 1, feats, mask, max_new_tokens=1, eos_token_id=[39])
    assert new[0, 0].item() == logits[0, -1].argmax().item()  # greedy's first token is the forward's argmax


def test_llava_save_load_round_trip_and_foreign_folder(tmp_path):
    from model import LLaVASLT
    m = _llava()
    llm_dir = tmp_path / "llm"
    m.llm.save_pretrained(str(llm_dir))
    for p in m.connector.parameters():
        _torch.nn.init.normal_(p, std=0.5)
    apply_lora(m.llm, ("q_proj",), r=2)
    _torch.nn.init.normal_(m.llm.model.layers[0].self_attn.q_proj.lora_B.weight, std=0.5)
    m.save(str(tmp_path / "vlt"), str(llm_dir), str(tmp_path / "visual"), {"system": "s", "language": "German"})
    loaded = LLaVASLT.load(str(tmp_path / "vlt"), load_visual=lambda folder: None)
    assert loaded.config["system"] == "s" and loaded.config["llm"] == str(llm_dir)
    ids = _torch.tensor([[5, 1, 1, 7, 8]])
    feats, mask = _torch.randn(1, 2, 6), _torch.ones(1, 2, dtype=_torch.bool)
    am = _torch.ones_like(ids)
    _torch.testing.assert_close(loaded(ids, am, ids == 1, feats, mask), m.eval()(ids, am, ids == 1, feats, mask))
    with _pytest.raises(ValueError, match="not a LLaVA-SLT folder"):
        LLaVASLT.load(str(llm_dir), load_visual=lambda folder: None)
    with _pytest.raises(FileNotFoundError, match="no config.json"):
        LLaVASLT.load(str(tmp_path), load_visual=lambda folder: None)


def test_llava_prefix_cache_gives_the_same_logits_and_connector_gradients():
    from model import PrefixCache
    m = _llava()
    m.llm.requires_grad_(False)
    ids = _torch.tensor([[5, 9, 1, 1, 1, 7, 8, 3], [5, 9, 1, 1, 7, 8, 0, 0]])
    am = (ids != 0).long()
    feats = _torch.randn(2, 3, 6)
    mask = _torch.tensor([[True, True, True], [True, True, False]])
    full = m(ids, am, ids == 1, feats, mask)
    gf = _torch.autograd.grad(full[:, 2:][am[:, 2:].bool()].square().sum(), list(m.connector.parameters()))
    prefix = PrefixCache(m.llm, [5, 9])
    part = m(ids, am, ids == 1, feats, mask, prefix=prefix)  # (B, T - 2, V)
    assert part.shape == (2, 6, 40)
    _torch.testing.assert_close(part[am[:, 2:].bool()], full[:, 2:][am[:, 2:].bool()], atol=1e-5, rtol=1e-5)
    gp = _torch.autograd.grad(part[am[:, 2:].bool()].square().sum(), list(m.connector.parameters()))
    for a, b in zip(gp, gf):
        _torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with _torch.autocast("cpu", dtype=_torch.bfloat16):  # as training runs on CUDA (bf16 autocast)
        low = m(ids, am, ids == 1, feats, mask, prefix=prefix)
    assert low.dtype == _torch.bfloat16
    _torch.testing.assert_close(low.float()[am[:, 2:].bool()], part[am[:, 2:].bool()], atol=0.05, rtol=0.05)
    with _pytest.raises(ValueError, match="start with the prefix"):
        m(ids.flip(1), am, ids == 1, feats, mask, prefix=prefix)
    m.llm.lm_head.weight.requires_grad_(True)
    with _pytest.raises(ValueError, match="frozen LLM"):
        m(ids, am, ids == 1, feats, mask, prefix=prefix)


@torch.no_grad()
def test_length_penalty_decides_between_finished_beams_of_different_lengths(hf_pair):
    """The case where the penalty matters: with 0 (sum of log-probs) the beams favour short
    finished hypotheses, with 2 long ones; ours picks as transformers does in both."""
    hf, _, llm = hf_pair
    for seed in range(5, 40):
        ids, mask = _left_padded(hf.config.vocab_size, [11, 6, 3], seed=seed)
        eos = _emitted_eos(llm, ids, mask)
        kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=1, num_beams=3)
        short, long = (llm.generate(ids, attention_mask=mask, length_penalty=lp, **kw) for lp in (0.0, 2.0))
        if not torch.equal(short, long):
            break
    else:
        pytest.fail("no prompt where the length penalty changes the answer")
    lengths = [(~torch.isin(out, torch.tensor(eos + [1]))).sum(1) for out in (short, long)]
    assert (lengths[0] <= lengths[1]).all() and (lengths[0] < lengths[1]).any()
    for lp, ours in ((0.0, short), (2.0, long)):
        assert torch.equal(ours, _hf_generate(hf, ids, mask, length_penalty=lp, **kw)), lp
