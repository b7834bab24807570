"""Tests for model.py, against tiny random transformers models built in the test."""

# ============================================================================ LLM


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
    cfg = _json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["target_modules"] == ["q_proj", "v_proj"]
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
