"""The language side of LLaVA-SLT (paper sections 3.1 and 3.3).

Reads top to bottom: LLMConfig -> RMSNorm -> RoPE -> attention -> MLP -> LLM (Qwen2/2.5,
Qwen1.5, Llama-3.x, loaded from and saved to Hugging Face folders) -> generation ->
LoRA -> Connector -> LLaVASLT (the tokenizer and chat templates are in tokenizer.py).
Parameter names equal the public checkpoints' names, so loading is a loop over keys.
"""

import json
import math
import os
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf import CheckpointError, checkpoint_folder, file_sha256, read_json, read_safetensors, safetensors_metadata


def copy_strict(own: dict, tensors: dict, where: str, source: dict = None):
    """Copy checkpoint `tensors` into the model's `own` {name: tensor}, strictly: a missing,
    unexpected or mis-shaped key raises one line naming the file (source[name] when known,
    else `where`) and the key. Every loader of ours goes through here (never warn-and-continue)."""
    source = source or {}
    for k in sorted(own.keys() - tensors.keys()):
        raise CheckpointError(f"{where}: missing {k}")
    for k in sorted(tensors.keys() - own.keys()):
        raise CheckpointError(f"{source.get(k, where)}: unexpected {k} (made for another model?)")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source.get(k, where)}: {k} has shape {tuple(v.shape)}, "
                             f"the model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


# ----------------------------------------------------------------------------- LLM
# The decoder LLM of section 3.1 (Qwen2.5-7B-Instruct by default; Qwen1.5 and Llama-3.1 in the
# Tab. 6 ablation, Llama-3.1-8B-Instruct for Phoenix). One module family covers all three:
# they differ only in q/k/v biases, RoPE frequency scaling and tied embeddings.

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LLMConfig:
    """Defaults are Qwen2.5-7B-Instruct's config.json."""
    model_type: str = "qwen2"             # "qwen2" (Qwen1.5/2/2.5) or "llama" (Llama-3.x)
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4          # < num_attention_heads: grouped-query attention
    head_dim: int | None = None           # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None      # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = True           # bias on q/k/v (always on in qwen2)
    o_proj_bias: bool = False             # llama's attention_bias covers o_proj too; qwen2 never
    mlp_bias: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151645
    pad_token_id: int | None = None
    dtype: str = "bfloat16"               # the dtype the checkpoint is stored in

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LLMConfig":
        """Read a Hugging Face config.json dict; the one place that knows both HF spellings
        (rope_theta/rope_scaling or rope_parameters; torch_dtype or dtype)."""
        model_type = d.get("model_type")
        if model_type not in ("qwen2", "llama"):
            raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                             "(qwen2 for Qwen1.5/2/2.5, llama for Llama-3.x)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{source}: missing {key}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (silu)")
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
            raise ValueError(f"{source}: sliding-window attention is not supported; set use_sliding_window to false")
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):  # transformers >= 5 spelling
            scaling = dict(rope)
            theta = scaling.pop("rope_theta", d.get("rope_theta", 10000.0))
        else:
            scaling = dict(d.get("rope_scaling") or {})
            theta = d.get("rope_theta", 10000.0)
        if "type" in scaling:  # older spelling of rope_type
            scaling.setdefault("rope_type", scaling.pop("type"))
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        llama = model_type == "llama"
        heads = d["num_attention_heads"]
        try:
            return cls(
                model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim"),
                max_position_embeddings=d.get("max_position_embeddings", 2048 if llama else 32768),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=d.get("attention_bias", False) if llama else True,
                o_proj_bias=d.get("attention_bias", False) if llama else False,
                mlp_bias=d.get("mlp_bias", False) if llama else False,
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch."))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        """The config.json transformers reads (old rope/dtype spellings, which 4.x and 5.x both accept)."""
        llama = self.model_type == "llama"
        if llama and self.o_proj_bias != self.attention_bias:
            raise ValueError("a llama config has one attention_bias for q/k/v/o; o_proj_bias must equal it")
        if not llama and (not self.attention_bias or self.o_proj_bias or self.mlp_bias):
            raise ValueError("a qwen2 config has q/k/v biases and no o_proj/MLP bias")
        d = {
            "architectures": ["LlamaForCausalLM" if llama else "Qwen2ForCausalLM"],
            "model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id, "torch_dtype": self.dtype,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        }
        if llama:
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as the public checkpoints were trained.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LLMConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32 on the CPU, with the config's frequency scaling."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables over positions, computed once in fp32 and grown by doubling when a longer
    position is asked for. Plain attributes, not buffers: `model.to(bfloat16)` must not round them."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.inv_freq = rope_inv_freq(config)  # (head_dim / 2,)
        self.cos = self.sin = None             # (n_positions, head_dim)

    def forward(self, position_ids, dtype, n_positions: int):
        device = position_ids.device
        if self.cos is None or self.cos.shape[0] < n_positions or self.cos.device != device:
            n = max(n_positions, 2 * self.cos.shape[0] if self.cos is not None else 256)
            freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[position_ids].to(dtype), self.sin[position_ids].to(dtype)  # (B, T, head_dim)


def rotate_half(x):
    # Halves, not interleaved pairs: the HF layout of the Qwen and Llama checkpoints.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (B, T, hd)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions, so a decoding step
    writes into a slice instead of concatenating. `length` positions are filled."""

    def __init__(self, config: LLMConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, KV, S_max, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def batch_size(self):
        return self.k.shape[1]

    def update(self, layer: int, k, v):
        """Store this step's k/v (B, KV, T, hd) and return all of them so far (B, KV, length + T, hd)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions, asked for {end}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n: int):
        """Each row n times (a prompt's cache copied to its beams)."""
        self.k, self.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)

    def reorder(self, index):
        """Rows take the cache of row index[i] (beam search keeps the best parents)."""
        n = self.length
        self.k[:, :, :, :n] = self.k[:, index, :, :n]
        self.v[:, :, :, :n] = self.v[:, index, :, :n]

    def advance(self, n: int):
        self.length += n


class PrefixCache:
    """Keys and values of a prompt prefix that every row starts with, for training with a frozen
    LLM: VLT's connector stage (section 3.3) feeds the same system turn in every example, so a
    frozen LLM's keys and values there never change and are computed once instead of every step.
    It is read-only, so one object serves every step: update() concatenates instead of writing
    in place (autograd must not see a buffer that later layers overwrite)."""

    def __init__(self, llm: "LLM", ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=llm.lm_head.weight.device)  # (P,)
        cache = KVCache(llm.config, 1, len(ids), device=ids.device, dtype=llm.lm_head.weight.dtype)
        with torch.no_grad():
            llm(ids[None], cache=cache)
        self.ids, self.k, self.v = ids, cache.k, cache.v  # (L, 1, KV, P, hd)
        self.length = len(ids)
        self.batch_size = None  # any: the one prefix row serves every row of a batch

    def update(self, layer: int, k, v):
        """This call's k/v (B, KV, T, hd) after the prefix's: (B, KV, P + T, hd)."""
        B = k.shape[0]
        # .to: under autocast the new keys are bf16 while the prefix was stored in the weights' dtype
        return (torch.cat([self.k[layer].to(k.dtype).expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].to(v.dtype).expand(B, -1, -1, -1), v], dim=2))

    def advance(self, n: int):
        pass  # every call continues from the prefix alone


class Attention(nn.Module):
    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        D, H, KV, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, KV * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, KV * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=config.o_proj_bias)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd)
        if mask is None:
            # No padding: causal attention over this call's tokens (no cache), or one new token
            # that sees every cached key (a decoding step). No mask keeps SDPA's GQA kernels.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)  # (B, H, T, hd)
        else:
            # On CUDA, a mask together with enable_gqa falls back to the math kernel (which
            # materialises every attention matrix); repeating the KV heads keeps the fused ones.
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        D, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, I, bias=bias)
        self.up_proj = nn.Linear(D, I, bias=bias)
        self.down_proj = nn.Linear(I, D, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if not isinstance(getattr(torch, str(d).removeprefix("torch."), None), torch.dtype):
        raise ValueError(f"unknown dtype {d!r} (float32, bfloat16, float16)")
    return getattr(torch, str(d).removeprefix("torch."))


def _eos_list(eos) -> list:
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


class LLM(nn.Module):
    """A decoder-only causal LM with the Hugging Face parameter names of Qwen2 and Llama."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own normal_ init: _init_weights below does it, and on the
        # meta device (from_pretrained) normal_ would import ~70 MB of torch for nothing.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size,
                                      _weight=torch.empty(config.vocab_size, config.hidden_size)),
            layers=nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.tie_weights()
        self._init_weights()
        # EOS ids generate() stops on by default: generation_config.json's when loaded from a folder.
        self.generation_config = {}
        self.generation_eos_ids = _eos_list(config.eos_token_id)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, std: float = 0.02):
        if self.lm_head.weight.is_meta:
            return  # from_pretrained fills the weights
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids):  # (B, T) -> (B, T, D)
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
                logits_to_keep: int = 0, hidden_states: bool = False):
        """Logits (B, T, V) in the model dtype; (B, n, V) of the last n positions with logits_to_keep=n
        (generation needs the last one only: the LM head over a whole prompt is wasted work);
        hidden_states=True: the last hidden states (B, T, D) after the final norm instead (an LLM
        as VCP's text supervisor, Tab. 7 row 6).

        attention_mask (B, S): 1 = token, 0 = padding, over the cached positions and this call's
        (S = cache.length + T). Without position_ids, positions count real tokens only
        (mask cumsum - 1), so a left-padded prompt is computed as it would be alone.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size not in (None, B):
            raise ValueError(f"the KV cache holds {cache.batch_size} rows, the input has {B}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                             "(cached positions + new tokens)")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:
                position_ids = attention_mask.long().cumsum(-1) - 1
                position_ids = position_ids.masked_fill(attention_mask == 0, 0)[:, past:]  # (B, T)
            n_positions = past + T
        else:
            n_positions = int(position_ids.max()) + 1
        cos, sin = self.rotary(position_ids, x.dtype, n_positions)  # (B, T, hd)
        mask = self._attention_mask(attention_mask, T, past, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]  # (B, n, D)
        if hidden_states:
            return self.model.norm(x)  # (B, T or n, D)
        return self._logits(self.model.norm(x))  # (B, T or n, V)

    def _logits(self, x):  # (B, T, D) -> (B, T, V)
        B, T, D = x.shape
        if x.device.type == "cpu" and B * T <= 32 and type(self.lm_head) is nn.Linear and not torch.is_grad_enabled():
            # Decoding on CPU: for a few rows, BLAS streams the big (V, D) head weight 1.5-2x faster
            # as the left operand (W @ x^T) than as the transposed right one (x @ W^T, nn.Linear).
            return (self.lm_head.weight @ x.reshape(B * T, D).T).T.reshape(B, T, -1).contiguous()
        return self.lm_head(x)

    @staticmethod
    def _attention_mask(attention_mask, T, past, device):
        """Boolean (B or 1, 1, T, S) mask, True = may attend; None when attention needs no mask:
        causal over this call's tokens (past == 0), or one token seeing every key (T == 1)."""
        if past == 0 and (attention_mask is None or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
            # No padding or right padding only (training batches): under a causal mask no real
            # token can see a pad, so SDPA's causal kernels give the same real-token outputs.
            return None
        if T == 1 and (attention_mask is None or bool(attention_mask.all())):
            # A decoding step with no padding anywhere: the new token attends to every position.
            return None
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(past + T, device=device)[None, :]        # (1, S)
        mask = (k_pos <= q_pos)[None]                                 # (1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]           # (B, T, S)
            # A padding query sees no real key; letting it see itself keeps SDPA off an all-masked
            # row (NaN in some kernels; torch's CPU kernel returns 0), and NaN in padding rows would
            # leak through 0 * NaN into real rows' values in the next layer.
            mask = mask | (k_pos == q_pos)
        return mask[:, None]  # (B, 1, T, S)

    # ------------------------------------------------------------------ Hugging Face folders

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu") -> "LLM":
        """Load config.json + model.safetensors (or shards + model.safetensors.index.json).

        The model is built on the meta device and each tensor is read from its file straight into
        its own memory (cast to `dtype`, placed on `device`) one at a time, so memory holds one
        copy of the weights plus at most one tensor. Missing, unexpected and mis-shaped keys are
        errors that name the file and the key.
        """
        dtype = _dtype(dtype)
        folder = checkpoint_folder(folder)  # a CPT save cut by a kill: its last whole checkpoint
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder}: no config.json; an LLM folder holds config.json and model.safetensors "
                                    "(or model-*.safetensors shards with model.safetensors.index.json)")
        config = LLMConfig.from_hf(read_json(config_path), source=config_path)
        key_files, missing_source = _checkpoint_keys(folder)
        with torch.device("meta"):
            llm = cls(config)
        expected = dict(llm.named_parameters())  # tied lm_head.weight is not listed (shared)
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
        for key, path in key_files.items():
            if key not in expected and key not in ignored:
                raise CheckpointError(f"checkpoint {path}: unexpected {key}")
        for key in expected:
            if key not in key_files:
                raise CheckpointError(f"checkpoint {missing_source}: missing {key}")
        by_file = {}
        for key, path in key_files.items():
            if key in expected:
                by_file.setdefault(path, []).append(key)
        # Shapes first (headers only), so a wrong checkpoint fails before gigabytes are read.
        headers = {path: _safetensors_header(path) for path in by_file}
        for path, keys in by_file.items():
            entries = headers[path][0]
            for key in keys:
                if key not in entries:
                    raise CheckpointError(f"checkpoint {path}: missing {key} (the index lists it in this shard)")
                shape = tuple(entries[key]["shape"])
                if shape != tuple(expected[key].shape):
                    raise ValueError(f"checkpoint {path}: {key} has shape {shape}, "
                                     f"the config expects {tuple(expected[key].shape)}")
        modules = dict(llm.named_modules())
        for path, keys in by_file.items():
            entries, data_start = headers[path]
            # Plain reads, not safetensors' mmap: a mapped tensor keeps the whole shard's pages
            # resident and stays backed by the file (which a later save into the folder overwrites).
            with open(path, "rb", buffering=0) as f:
                for key in keys:
                    module_name, name = key.rsplit(".", 1)
                    tensor = _read_tensor(f, path, key, entries[key], data_start, dtype, device)
                    modules[module_name]._parameters[name] = nn.Parameter(tensor)
                    del tensor
        llm.tie_weights()
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen_path):
            llm.generation_config = read_json(gen_path)
            if llm.generation_config.get("eos_token_id") is not None:
                llm.generation_eos_ids = _eos_list(llm.generation_config["eos_token_id"])
        return llm.eval()

    def save_pretrained(self, folder: str, max_shard_size: int = 2**30, tokenizer=None, dtype=None):
        """Write a folder transformers.AutoModelForCausalLM.from_pretrained loads: config.json,
        model.safetensors (or shards of at most max_shard_size bytes + model.safetensors.index.json),
        generation_config.json (and the tokenizer's files when one is given). `dtype`: the
        weights' dtype on disk (default: as in memory; training keeps fp32 master weights)."""
        from safetensors.torch import save_file
        tensors = merged_parameters(self)  # tied head listed once; LoRA folded in, the model unchanged
        if dtype is not None:
            tensors = {k: v.to(_dtype(dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
        os.makedirs(folder, exist_ok=True)
        shards, size = [{}], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file({k: v.cpu() for k, v in shard.items()}, os.path.join(folder, name), metadata={"format": "pt"})
        index_path = os.path.join(folder, "model.safetensors.index.json")
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
        # Weights of an earlier save into the same folder would shadow or confuse the new ones.
        for old in os.listdir(folder):
            weights = old == "model.safetensors" or (old.startswith("model-") and "-of-" in old
                                                     and old.endswith(".safetensors"))
            if (weights and old not in names) or (old == "model.safetensors.index.json" and len(shards) == 1):
                os.remove(os.path.join(folder, old))
        config = self.config.to_hf()
        config["torch_dtype"] = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen = dict(self.generation_config)
        eos = self.generation_eos_ids
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        gen.setdefault("bos_token_id", self.config.bos_token_id)
        if self.config.pad_token_id is not None:
            gen.setdefault("pad_token_id", self.config.pad_token_id)
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 32,
                 eos_token_id=None, num_beams: int = 1, length_penalty: float = 1.0, pad_token_id=None):
        """New tokens only (B, <= max_new_tokens), rows padded with pad_token_id (default: the first
        EOS id) after their EOS. Prompts are left-padded (attention_mask 0 on the left).

        eos_token_id: int or list; None uses the folder's generation_config.json EOS ids (or the
        config's). num_beams > 1 is beam search exactly as transformers' generate(num_beams=k,
        do_sample=False, length_penalty=..., early_stopping=False) does it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        eos = _eos_list(eos_token_id) if eos_token_id is not None else list(self.generation_eos_ids)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=embeds.device)
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {(B, T)}")
        if max_new_tokens <= 0:
            return torch.empty(B, 0, dtype=torch.long, device=embeds.device)
        # The mask of every position the loop can reach, filled with 1 for generated tokens.
        full_mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=embeds.device)
        full_mask[:, :T] = attention_mask
        cache = KVCache(self.config, B, T + max_new_tokens, embeds.device, embeds.dtype)
        logits = self(inputs_embeds=embeds, attention_mask=full_mask[:, :T], cache=cache,
                      logits_to_keep=1)[:, -1].float()  # (B, V)
        eos_t = torch.tensor(eos, dtype=torch.long, device=embeds.device)
        if num_beams == 1:
            return self._greedy(logits, cache, full_mask, T, max_new_tokens, eos_t, pad)
        return self._beam_search(logits, cache, full_mask, T, max_new_tokens, eos_t, pad, num_beams, length_penalty)

    def _greedy(self, logits, cache, full_mask, T, max_new_tokens, eos, pad):
        B = logits.shape[0]
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=logits.device)
        done = torch.zeros(B, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            token = torch.where(done, pad, logits.argmax(-1))  # (B,)
            out[:, step] = token
            done |= torch.isin(token, eos)
            if step + 1 == max_new_tokens or bool(done.all()):
                return out[:, :step + 1]
            logits = self(token[:, None], attention_mask=full_mask[:, :T + step + 1], cache=cache)[:, -1].float()

    def _beam_search(self, logits, cache, full_mask, T, max_new_tokens, eos, pad, K, length_penalty):
        """transformers' beam search (generation/utils.py `_beam_search`, 5.x), on tensors.

        Each step keeps the top (1 + #eos, at least 2) * K continuations of all beams; those ending
        in EOS (or at max length) among the top K become finished hypotheses scored
        logprob / new_length ** length_penalty; the best K unfinished continue. A prompt stops
        once its K finished hypotheses are all better than what its best running beam could
        still reach at the current length (early_stopping=False).
        """
        B, V = logits.shape
        L, dev = max_new_tokens, logits.device
        keep = max(2, 1 + len(eos)) * K
        top_k_mask = torch.arange(keep, device=dev) < K                      # (keep,)
        log_probs = F.log_softmax(logits, dim=-1).repeat_interleave(K, 0)    # (B*K, V)
        cache.repeat_interleave(K)
        full_mask = full_mask.repeat_interleave(K, 0)                        # (B*K, T + L)
        running = torch.full((B, K, L), pad, dtype=torch.long, device=dev)   # running beams' new tokens
        running_scores = torch.zeros(B, K, device=dev)
        running_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
        finished = running.clone()                                           # (B, K, L) best finished
        finished_scores = torch.full((B, K), -1e9, device=dev)
        finished_len = torch.zeros(B, K, dtype=torch.long, device=dev)
        is_finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
        open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)              # can still improve
        batch_offset = torch.arange(B, device=dev)[:, None] * K
        for step in range(L):
            scores = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
            top_scores, top_idx = torch.topk(scores, keep)                   # (B, keep)
            parent, token = top_idx // V, top_idx % V
            candidates = running.gather(1, parent[:, :, None].expand(B, keep, L)).clone()  # (B, keep, L)
            candidates[:, :, step] = token
            hits = torch.isin(token, eos) | (step + 1 == L)                  # (B, keep) stop here
            # The best K that did not stop keep running.
            alive_scores = top_scores + hits.to(torch.float32) * -1.0e9
            nxt = torch.topk(alive_scores, K).indices                        # (B, K)
            running = candidates.gather(1, nxt[:, :, None].expand(B, K, L))
            running_scores = alive_scores.gather(1, nxt)
            parent_rows = (parent.gather(1, nxt) + batch_offset).view(-1)   # (B*K,)
            # Stopped candidates among the top K compete with the finished ones.
            just = hits & top_k_mask[None, :]
            new_scores = top_scores / ((step + 1) ** length_penalty)
            new_scores = new_scores + (~open_).to(torch.float32) * -1.0e9
            new_scores = new_scores + (~just) * -1.0e9
            merged_scores = torch.cat((finished_scores, new_scores), 1)      # (B, K + keep)
            best = torch.topk(merged_scores, K).indices                      # (B, K)
            finished = torch.cat((finished, candidates), 1).gather(1, best[:, :, None].expand(B, K, L))
            finished_scores = merged_scores.gather(1, best)
            new_len = torch.full((B, keep), step + 1, dtype=torch.long, device=dev)
            finished_len = torch.cat((finished_len, new_len), 1).gather(1, best)
            is_finished = torch.cat((is_finished, just), 1).gather(1, best)
            # transformers' early-stop heuristic: the best running score at the current length.
            best_possible = running_scores[:, :1] / ((step + 1) ** length_penalty)
            worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, -1.0e9)
            open_ = open_ & (best_possible > worst).any(-1, keepdim=True)
            if step + 1 == L or not bool(open_.any()) or bool(hits.all()):
                break
            cache.reorder(parent_rows)
            token = running[:, :, step].reshape(B * K, 1)
            logits = self(token, attention_mask=full_mask[:, :T + step + 1], cache=cache)[:, -1].float()
            log_probs = F.log_softmax(logits, dim=-1)                        # (B*K, V)
        n = int(finished_len[:, 0].max())
        return finished[:, 0, :n]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(path: str):
    """({key: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a .safetensors file.

    The format: 8 bytes little-endian header length, a JSON header, then the raw tensor bytes.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"checkpoint {path}: not a safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"checkpoint {path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(f, path, key, entry, data_start, dtype, device):
    """Read one tensor from an open safetensors file into fresh memory of `dtype` on `device`."""
    src = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if src is None:
        raise ValueError(f"checkpoint {path}: {key} has dtype {entry['dtype']}, which this loader does not read")
    begin, end = entry["data_offsets"]
    out = torch.empty(entry["shape"], dtype=src)  # CPU; the parameter itself when no cast or move is needed
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    if end - begin != len(buf):
        raise ValueError(f"checkpoint {path}: {key} holds {end - begin} bytes, its shape and dtype need {len(buf)}")
    f.seek(data_start + begin)
    while len(buf):  # one read may return less than asked (files over 2 GB, pipes)
        n = f.readinto(buf)
        if not n:
            raise ValueError(f"checkpoint {path}: file ends inside {key} (truncated download?)")
        buf = buf[n:]
    return out.to(device=device, dtype=dtype)


def _checkpoint_keys(folder: str):
    """{key: safetensors path} of a folder's weights and the file a missing key is reported against."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"checkpoint {index_path}: no weight_map")
        for name in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"checkpoint {index_path}: shard {name} is missing from {folder}")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}, index_path
    if os.path.isfile(single):
        return {k: single for k in _safetensors_header(single)[0]}, single
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json; an LLM folder holds "
                            "config.json and safetensors weights (pickled .bin checkpoints are not loaded)")



# ----------------------------------------------------------------------------- LoRA
# LoRA (Hu et al.), as the paper uses for the DINOv2 backbone (r=8, alpha=16) and for the
# LLM during the optional full-tuning pass of section 3.3.

class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update: y = x W^T + b + dropout(x) A^T B^T * alpha / r.

    `weight` and `bias` keep the wrapped layer's names, so a base checkpoint still loads
    into a model that already has adapters; `lora_A.weight` / `lora_B.weight` are PEFT's
    names for the adapter matrices. The adapters are fp32 whatever the base weight's dtype:
    they are what trains, and an update of lr 1e-5 to a bf16 weight mostly rounds away.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
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
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scale
        return out + update.to(out.dtype)  # under autocast both run in the autocast dtype anyway

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


@torch.no_grad()
def merged_parameters(module: nn.Module) -> dict:
    """{name: tensor} of the module's parameters with every LoRALinear folded into its weight
    (W + B A * alpha / r) under the base names, adapters left out; the module is unchanged,
    so a training run can save a plain checkpoint and go on."""
    lora = {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for name, p in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if owner in lora and leaf == "weight":
            m = lora[owner]
            delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scale
            out[name] = (p.float() + delta).to(p.dtype)
        else:
            out[name] = p.detach().contiguous()
    return out


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
    path = os.path.join(folder, "adapter_model.safetensors")
    cfg_path = os.path.join(folder, "adapter_config.json")
    for p in (path, cfg_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: not found; an adapter folder holds adapter_model.safetensors and adapter_config.json")
    cfg = read_json(cfg_path)
    if not any(isinstance(m, LoRALinear) for m in module.modules()):
        apply_lora(module, cfg["target_modules"], cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    tensors = {k.removeprefix("base_model.model."): v for k, v in read_safetensors(path).items()}
    copy_strict(lora_parameters(module), tensors, path)
    return module


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
# Section 3.3 / Fig. 2 right: the connector output is inserted into the user turn of the
# chat template, "concatenating them with text token embeddings as the overall input".
# The visual encoder is passed in (model.py does not import vision.py).

class LLaVASLT(nn.Module):
    """Connector + LLM (+ the visual encoder when it is tuned too). Prompts hold `slot_mask`
    positions whose embeddings are replaced by the projected visual tokens, one slot per valid
    word feature (for the sentence-level ablation of Tab. 8, one per position of the
    full-attention encoder's penultimate layer)."""

    def __init__(self, llm: nn.Module, connector: Connector, visual_encoder: nn.Module = None,
                 visual_tokens: str = "word"):
        super().__init__()
        if visual_tokens not in ("word", "sentence"):
            raise ValueError(f"visual_tokens must be 'word' or 'sentence', got {visual_tokens!r}")
        self.llm = llm
        self.connector = connector
        self.visual_encoder = visual_encoder
        self.visual_tokens = visual_tokens

    def visual_features(self, frames, frame_mask):
        """frames (B, T, 3, H, W) -> visual tokens (B, N, D_visual) and their mask (B, N)."""
        out = self.visual_encoder.encode_video(frames, frame_mask)
        if self.visual_tokens == "sentence":  # Tab. 8 row 1: the full-attention encoder's penultimate layer
            return out["sentence_features"], out["word_mask"]  # (B, N, D): a whole-clip receptive field each
        return out["word_features"], out["word_mask"]

    def splice(self, input_ids, slot_mask, word_features, word_mask):
        """Token embeddings with the visual tokens written into the slots.

        input_ids, slot_mask: (B, T); word_features: (B, N, D_visual); word_mask: (B, N).
        Row b must have exactly word_mask[b].sum() slots; both are filled in reading order.
        """
        embeds = self.llm.embed(input_ids)  # (B, T, D)
        visual = self.connector(word_features).to(embeds.dtype)  # (B, N, D)
        n_slots, n_valid = slot_mask.sum(1), word_mask.sum(1)
        if not torch.equal(n_slots, n_valid):
            raise ValueError(f"prompt slots {n_slots.tolist()} do not match valid visual tokens {n_valid.tolist()}")
        return embeds.masked_scatter(slot_mask.unsqueeze(-1), visual[word_mask])

    def forward(self, input_ids, attention_mask, slot_mask, word_features=None, word_mask=None,
                frames=None, frame_mask=None, prefix: PrefixCache = None):
        """Logits (B, T, V) from cached visual tokens, or from frames through the visual encoder.

        With `prefix` (the frozen LLM's PrefixCache of the first P tokens every row starts with),
        only the rest is computed and the logits are those of positions P.. (B, T - P, V).
        """
        if frames is not None:
            word_features, word_mask = self.visual_features(frames, frame_mask)
        cache = None
        if prefix is not None:
            P = prefix.length
            if not (torch.equal(input_ids[:, :P], prefix.ids.expand(len(input_ids), P))
                    and bool(attention_mask[:, :P].all()) and not bool(slot_mask[:, :P].any())):
                raise ValueError("LLaVASLT.forward: every row must start with the prefix's tokens "
                                 "(right-padded prompts with the same system turn)")
            if any(p.requires_grad for p in self.llm.parameters()):
                raise ValueError("LLaVASLT.forward: a PrefixCache needs a frozen LLM (its keys would go stale)")
            input_ids, slot_mask, cache = input_ids[:, P:], slot_mask[:, P:], prefix  # (B, T - P)
        embeds = self.splice(input_ids, slot_mask, word_features, word_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache)  # (B, T or T - P, V)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, slot_mask, word_features, word_mask, **kwargs):
        """Left-padded prompts ending with the assistant header -> new token ids (B, <=max_new_tokens)."""
        embeds = self.splice(input_ids, slot_mask, word_features, word_mask)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    # A LLaVA-SLT folder: config.json (the LLM and visual-encoder folders it builds on, relative
    # to itself, and the settings) + connector.safetensors, and after full-tuning llm_adapter/
    # (LoRA on the LLM) and visual/ (the tuned visual encoder).
    def save(self, folder: str, llm_folder: str, visual_folder: str, settings: dict, save_visual=None):
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.connector.state_dict().items()},
                  os.path.join(folder, "connector.safetensors"))
        if any(isinstance(m, LoRALinear) for m in self.llm.modules()):
            save_lora(self.llm, os.path.join(folder, "llm_adapter"))
        if save_visual is not None:
            save_visual(os.path.join(folder, "visual"))
        config = {"format": "llava-slt", "llm": os.path.relpath(os.path.abspath(llm_folder), os.path.abspath(folder)),
                  "visual": os.path.relpath(os.path.abspath(visual_folder), os.path.abspath(folder)),
                  "connector": self.connector.kind, "visual_dim": self.connector_dims()[0],
                  "visual_tokens": self.visual_tokens, **settings}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)

    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def connector_dims(self):
        first = self.connector.proj[0] if self.connector.kind == "mlp" else self.connector.proj
        return first.in_features, self.llm.config.hidden_size

    @staticmethod
    def read_config(folder: str, check_visual: bool = True) -> dict:
        """config.json with the LLM and visual folders resolved; check_visual: refuse when the
        visual encoder the connector was trained on changed since (its recorded sha256)."""
        folder = checkpoint_folder(folder)  # a save cut by a kill: its last whole checkpoint
        path = os.path.join(folder, "config.json")
        config = read_json(path) if os.path.isfile(path) else None
        if config is None:
            raise FileNotFoundError(f"{folder}: no config.json; not a LLaVA-SLT folder (train_vlt.py writes one)")
        if config.get("format") != "llava-slt":
            raise ValueError(f"{path}: not a LLaVA-SLT folder (train_vlt.py writes one with \"format\": \"llava-slt\")")
        for key in ("llm", "visual"):  # stored relative to the folder, so the tree can move
            config[key] = checkpoint_folder(os.path.join(folder, config[key]))
        if os.path.isdir(os.path.join(folder, "visual")):
            config["visual"] = os.path.join(folder, "visual")
        elif check_visual and config.get("visual_sha256"):
            weights = os.path.join(config["visual"], "model.safetensors")
            if os.path.isfile(weights) and file_sha256(weights) != config["visual_sha256"]:
                safetensors_metadata(weights)  # a damaged file is named as such, not as another encoder
                raise ValueError(f"{weights}: the visual encoder changed since {folder} was trained on it "
                                 "(another sha256); train the connector again on this encoder, or restore "
                                 "the encoder it was trained on")
        config["folder"] = folder
        return config

    @classmethod
    def load(cls, folder: str, load_visual, dtype=torch.float32, device="cpu") -> "LLaVASLT":
        """load_visual(folder) -> the visual encoder (vision.VCPModel.load); model.py does not import vision.py."""
        config = cls.read_config(folder)
        folder = config["folder"]
        llm = LLM.from_pretrained(config["llm"], dtype=dtype, device=device)
        if os.path.isdir(os.path.join(folder, "llm_adapter")):
            load_lora(llm, os.path.join(folder, "llm_adapter"))
        connector = Connector(config["visual_dim"], llm.config.hidden_size, config["connector"])
        path = os.path.join(folder, "connector.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found; the folder holds no trained connector")
        copy_strict(connector.state_dict(), read_safetensors(path), path)
        model = cls(llm, connector.to(device=device, dtype=dtype), load_visual(config["visual"]),
                    config["visual_tokens"])
        model.config = config
        return model.eval()
