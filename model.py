"""The language side of LLaVA-SLT (paper sections 3.1 and 3.3).

Reads top to bottom: LLMConfig -> RMSNorm -> RoPE -> attention -> MLP -> LLM (Qwen2/2.5,
Qwen1.5, Llama-3.x, loaded from and saved to Hugging Face folders) -> generation ->
LoRA -> Tokenizer (tokenizer.json + chat templates) -> Connector -> LLaVASLT.
Parameter names equal the public checkpoints' names, so loading is a loop over keys.
"""

import json
import math
import os
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # LLaVA's convention: labels that take no loss


# ----------------------------------------------------------------------------- LLM
# (section owned by the LLM work: LLMConfig, RMSNorm, RoPE, Attention, MLP, LLM, generate)


# ----------------------------------------------------------------------------- LoRA
# LoRA (Hu et al.), as the paper uses for the DINOv2 backbone (r=8, alpha=16) and for the
# LLM during the optional full-tuning pass of section 3.3.

class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update: y = x W^T + b + dropout(x) A^T B^T * alpha / r.

    `weight` and `bias` keep the wrapped layer's names, so a base checkpoint still loads
    into a model that already has adapters; `lora_A.weight` / `lora_B.weight` are PEFT's
    names for the adapter matrices.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self):
        # A random, B zero: the wrapped layer starts out unchanged (LoRA paper, section 4.1).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + B A * alpha / r (for saving or fast inference)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
        lin.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


def apply_lora(module: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> list:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns the wrapped names.

    Base weights are untouched; freezing them is the caller's choice (see `lora_parameters`).
    """
    wrapped = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"apply_lora: no nn.Linear named any of {list(targets)} in {type(module).__name__}")
    return wrapped


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the plain nn.Linear it equals; returns the module."""
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
    return module


def lora_parameters(module: nn.Module) -> dict:
    """{name: parameter} of the adapter matrices only."""
    return {n: p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def save_lora(module: nn.Module, folder: str):
    """Adapters on their own, PEFT-style: adapter_model.safetensors + adapter_config.json."""
    from safetensors.torch import save_file
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("save_lora: the module has no LoRA layers")
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, LoRALinear)})
    os.makedirs(folder, exist_ok=True)
    tensors = {f"base_model.model.{n}": p.detach().contiguous().cpu() for n, p in lora_parameters(module).items()}
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": layers[0].r, "lora_alpha": layers[0].alpha,
              "target_modules": targets, "bias": "none",
              "lora_dropout": layers[0].dropout.p if isinstance(layers[0].dropout, nn.Dropout) else 0.0}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_lora(module: nn.Module, folder: str) -> nn.Module:
    """Apply adapters saved by `save_lora` (wrapping the target layers first if needed)."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "adapter_model.safetensors")
    cfg_path = os.path.join(folder, "adapter_config.json")
    for p in (path, cfg_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: not found; an adapter folder holds adapter_model.safetensors and adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if not any(isinstance(m, LoRALinear) for m in module.modules()):
        apply_lora(module, cfg["target_modules"], cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    own = lora_parameters(module)
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
    for k in sorted(set(own) - set(tensors)):
        raise KeyError(f"{path}: missing {k}")
    for k in sorted(set(tensors) - set(own)):
        raise KeyError(f"{path}: unexpected {k} (the adapter was made for another model)")
    with torch.no_grad():
        for k, v in tensors.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)
    return module


# ----------------------------------------------------------------------------- Tokenizer
# (section owned by the tokenizer work: Tokenizer, chat templates)


# ----------------------------------------------------------------------------- Connector
# Section 3.3: "We choose a two-layer MLP as the connector as LLaVA-1.5 proposed", applied
# to the word-level visual tokens; the linear variant is the Tab. 8 row-2 ablation.

class Connector(nn.Module):
    def __init__(self, visual_dim: int, llm_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"connector kind must be 'mlp' or 'linear', got {kind!r}")
        self.kind = kind
        if kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(visual_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        else:
            self.proj = nn.Linear(visual_dim, llm_dim)

    def forward(self, word_features):  # (B, N, D_visual) -> (B, N, D_llm)
        return self.proj(word_features)


# ----------------------------------------------------------------------------- LLaVASLT
# (section added with the trilogy: connector + LLM, visual tokens spliced into inputs_embeds)
