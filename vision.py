"""The visual side of LLaVA-SLT: visual contrastive pretraining (VCP, paper section 3.2).

Reads top to bottom: checkpoint helpers -> ViT (DINOv2, with and without registers, Hugging
Face parameter names) -> HierarchicalEncoder (frame -> word -> sentence, Fig. 4) ->
TextEncoder (the frozen mBART encoder that supervises VCP) -> VCPModel (ViT + LoRA +
hierarchical encoder + projections into the CLIP space + logit scale).

Parameter names equal the public checkpoints' names, so loading is a loop over keys, and a
missing, unexpected or mis-shaped key is a one-line error naming the file and the key.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf import checkpoint_folder, read_json, read_safetensors
from model import LLM, apply_lora, apply_rope, copy_strict
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- checkpoints
# One place knows the file layouts of a Hugging Face folder: model.safetensors or sharded
# safetensors (model.safetensors.index.json). Pickled pytorch_model.bin files are never
# loaded (a pickle can run code); convert them once on a trusted machine.


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; expected a Hugging Face model folder")
    return read_json(path)


def _read_checkpoint(folder: str, keep) -> tuple:
    """({name: tensor} for the names `keep(name)` accepts, {name: file it came from}, the file
    (or shard index) to name when a key is missing)."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single) or os.path.isfile(index):
        if os.path.isfile(single):
            files = [single]
        else:
            files = [os.path.join(folder, s) for s in sorted(set(read_json(index)["weight_map"].values()))]
        tensors, source = {}, {}
        for path in files:
            part = read_safetensors(path, keep)  # only what is used (mBART: the decoder stays on disk)
            tensors.update(part)
            source.update(dict.fromkeys(part, path))
        return tensors, source, single if os.path.isfile(single) else index
    hint = (" (it has pytorch_model.bin, a pickle, which is not loaded: convert it once with "
            "transformers' save_pretrained(..., safe_serialization=True))"
            if os.path.isfile(os.path.join(folder, "pytorch_model.bin")) else "")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def _load_strict(module: nn.Module, tensors: dict, source: dict, where: str, skip=lambda k: False):
    """Strict loading (model.copy_strict) of everything in the module's state dict but `skip`."""
    own = {k: v for k, v in module.state_dict().items() if not skip(k)}
    copy_strict(own, tensors, f"checkpoint {where}", {k: f"checkpoint {v}" for k, v in source.items()})


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _square(v, name: str) -> int:
    """DINOv2 configs give image/patch sizes as an int or a square pair."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"config {name}={v}: only square sizes are supported")
        return int(v[0])
    return int(v)


# ----------------------------------------------------------------------------- ViT (DINOv2)
# "We employ the ViT-B/14-distilled variant of DINOv2 and use its [cls] token as the full
# image feature. It is tuned by LoRA with a rank 8 and an alpha 16." Numerics follow
# transformers' Dinov2Model / Dinov2WithRegistersModel (5.24), names follow its checkpoints.

@dataclass
class ViTConfig:
    hidden_size: int = 768  # defaults: facebook/dinov2-base (the paper's ViT-B/14)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    patch_size: int = 14
    image_size: int = 518  # the checkpoint's grid (37 x 37); other sizes interpolate it
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    use_swiglu_ffn: bool = False  # True only for dinov2-giant
    use_mask_token: bool = True
    num_register_tokens: int = 0
    model_type: str = "dinov2"  # or "dinov2_with_registers" (register tokens, antialiased resize)

    @classmethod
    def from_hf(cls, d: dict) -> "ViTConfig":
        model_type = d.get("model_type", "dinov2")
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"config model_type {model_type!r}: expected dinov2 or dinov2_with_registers")
        registers = model_type == "dinov2_with_registers"
        return cls(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=d["num_attention_heads"], mlp_ratio=d.get("mlp_ratio", 4),
                   patch_size=_square(d.get("patch_size", 14), "patch_size"),
                   image_size=_square(d.get("image_size", 518), "image_size"),
                   num_channels=d.get("num_channels", 3), layer_norm_eps=d.get("layer_norm_eps", 1e-6),
                   layerscale_value=d.get("layerscale_value", 1.0), qkv_bias=d.get("qkv_bias", True),
                   hidden_act=d.get("hidden_act", "gelu"), use_swiglu_ffn=d.get("use_swiglu_ffn", False),
                   # the registers checkpoints always carry a mask token
                   use_mask_token=True if registers else d.get("use_mask_token", True),
                   num_register_tokens=d.get("num_register_tokens", 4) if registers else 0,
                   model_type=model_type)

    @property
    def registers(self) -> bool:
        return self.model_type == "dinov2_with_registers"


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values):  # (N, 3, H, W) -> (N, H/p * W/p, D)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # unused here (masked-image pretraining only), kept so checkpoints load strictly
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if cfg.use_mask_token else None
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))
        if cfg.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D))

    def position_embedding(self, n_patches: int, height: int, width: int):  # -> (1, 1 + n_patches, D)
        """The checkpoint's patch grid resized as transformers does: to (H/p, W/p), bicubic, in fp32."""
        pos = self.position_embeddings
        n_positions = pos.shape[1] - 1
        if n_patches == n_positions and height == width:
            return pos
        p, D = self.cfg.patch_size, pos.shape[-1]
        side = int(math.sqrt(n_positions))
        grid = pos[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
        # bicubic in half precision shifts the embeddings, so resample in fp32
        grid = F.interpolate(grid.float(), size=(height // p, width // p), mode="bicubic",
                             align_corners=False, antialias=self.cfg.registers).to(pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D)  # (1, h*w, D)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values):  # (N, 3, H, W) -> (N, 1 + R + h*w, D)
        N, _, H, W = pixel_values.shape
        x = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))  # (N, h*w, D)
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)  # (N, 1 + h*w, D)
        x = x + self.position_embedding(x.shape[1] - 1, H, W)
        if self.cfg.registers:  # token order [CLS, registers, patches]; registers carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]], dim=1)
        return x


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.query = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.key = nn.Linear(D, D, bias=cfg.qkv_bias)
        self.value = nn.Linear(D, D, bias=cfg.qkv_bias)


class ViTSelfOutput(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.attention = ViTSelfAttention(cfg)  # `attention.attention.query` as in the checkpoints
        self.output = ViTSelfOutput(cfg)

    def forward(self, x, n_queries: int | None = None):  # (N, L, D) -> (N, L or n_queries, D)
        """n_queries: the outputs of the first n tokens only; every token is still a key and a value."""
        N, L, D = x.shape
        hd = D // self.n_heads
        q = self.attention.query(x if n_queries is None else x[:, :n_queries])
        q = q.view(N, -1, self.n_heads, hd).transpose(1, 2)  # (N, h, Lq, hd)
        k, v = (proj(x).view(N, L, self.n_heads, hd).transpose(1, 2)  # (N, h, L, hd)
                for proj in (self.attention.key, self.attention.value))
        y = F.scaled_dot_product_attention(q, k, v)  # (N, h, Lq, hd)
        return self.output.dense(y.transpose(1, 2).reshape(N, q.shape[2], D))  # (N, Lq, D)


class ViTLayerScale(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((cfg.hidden_size,), float(cfg.layerscale_value)))

    def forward(self, x):
        return x * self.lambda1


class ViTMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTSwiGLU(nn.Module):
    """dinov2-giant's MLP; checkpoint names weights_in (gate and up stacked) / weights_out."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = (int(int(cfg.hidden_size * cfg.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.weights_in = nn.Linear(cfg.hidden_size, 2 * hidden)
        self.weights_out = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        gate, up = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * up)


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(cfg)
        self.layer_scale1 = ViTLayerScale(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ViTSwiGLU(cfg) if cfg.use_swiglu_ffn else ViTMLP(cfg)
        self.layer_scale2 = ViTLayerScale(cfg)

    def forward(self, x, n_queries: int | None = None):  # (N, L, D) -> (N, L or n_queries, D)
        """n_queries: compute the first n tokens' outputs only (all tokens still attended to)."""
        h = self.attention(self.norm1(x), n_queries)
        x = (x if n_queries is None else x[:, :n_queries]) + self.layer_scale1(h)
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ViT(nn.Module):
    """DINOv2 backbone. vit(pixel_values (N, 3, H, W), ImageNet-normalised) -> CLS (N, D).

    Any H, W divisible by the patch size; frames run `chunk_size` at a time so a long video
    does not hold every frame's attention at once. `grad_checkpointing` keeps nothing of a
    chunk for the backward pass but its output and recomputes the chunk there: per frame,
    memory then holds the CLS feature instead of every layer's activations (checkpointing each
    layer instead would still keep the residual stream at all 12 layer boundaries, 21.75 MiB
    per 336 px frame of ViT-B/14), at the price of one more forward of the ViT; the peak of
    the recompute is one chunk's activations (lower --vit_chunk_size to lower it).
    """

    def __init__(self, config: ViTConfig, chunk_size: int = 64, grad_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.chunk_size = chunk_size
        self.grad_checkpointing = grad_checkpointing
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self._init_weights()

    def _init_weights(self):
        # transformers' Dinov2 init: truncated normal 0.02 for linear/conv/tokens, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=0.02)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=0.02)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers: the tokens before the patches."""
        return 1 + self.config.num_register_tokens

    def _run(self, pixel_values, cls_only: bool = False):  # (n, 3, H, W) -> (n, L, D), or (n, 1, D) cls_only
        x = self.embeddings(pixel_values)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            # When only CLS is wanted, the last layer computes it alone: its MLP and attention
            # output for the patch tokens would be thrown away (~7% of a 12-layer ViT's FLOPs).
            n_queries = 1 if cls_only and i == last else None
            x = layer(x, n_queries)
        return self.layernorm(x)

    def forward(self, pixel_values, all_tokens: bool = False, chunk_size: int | None = None):
        """(N, 3, H, W) -> (N, D) CLS after the final layernorm, or (N, 1 + R + h*w, D) with all_tokens."""
        N, _, H, W = pixel_values.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"ViT: image size {H}x{W} is not a multiple of the patch size {p}")
        chunk = chunk_size or self.chunk_size or N
        outs = []
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(0, N, chunk):
            if recompute:
                x = checkpoint(self._run, pixel_values[i:i + chunk], not all_tokens, use_reentrant=False)
            else:
                x = self._run(pixel_values[i:i + chunk], cls_only=not all_tokens)  # (n, L or 1, D)
            outs.append(x if all_tokens else x[:, 0])
        if not outs:  # no frames: keep the shapes right
            L = 1 + self.config.num_register_tokens + (H // p) * (W // p)
            shape = (0, L, self.config.hidden_size) if all_tokens else (0, self.config.hidden_size)
            return self.layernorm.weight.new_zeros(shape)
        return torch.cat(outs, dim=0)

    def add_lora(self, targets=("query", "value"), r: int = 8, alpha: float = 16, dropout: float = 0.0) -> list:
        """Wrap the attention projections named in `targets` (query, key, value, dense) with LoRA."""
        return apply_lora(self, targets=targets, r=r, alpha=alpha, dropout=dropout)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu", **kwargs) -> "ViT":
        """A DINOv2 folder (config.json + safetensors) as Dinov2Model.save_pretrained writes it.

        Keys may carry the `dinov2.` prefix (Dinov2ForImageClassification); the head is then ignored.
        """
        config = ViTConfig.from_hf(_read_config(folder))
        with torch.device(device):
            model = cls(config, **kwargs).to(dtype)
        tensors, source, where = _read_checkpoint(folder, keep=lambda k: True)
        if any(k.startswith("dinov2.") for k in tensors):  # a model with a head: keep the backbone only
            tensors = {k.removeprefix("dinov2."): v for k, v in tensors.items() if k.startswith("dinov2.")}
            source = {k.removeprefix("dinov2."): v for k, v in source.items() if k.startswith("dinov2.")}
        _load_strict(model, tensors, source, where)
        return model.to(device)


# ----------------------------------------------------------------------------- hierarchical encoder
# Fig. 4: frame features -> local-attention transformer (each frame sees +-window frames;
# RoPE over the frame index lets it tell a sign from its time reversal) -> nearest-neighbour
# downsample (every `step`-th frame) = word features -> full-attention transformer with a
# learnable query token prepended -> sentence embedding = the query token's output.

@dataclass
class HierarchicalConfig:
    input_dim: int = 768  # frame feature width (VCPModel sets it from the ViT)
    dim: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    local_layers: int = 4  # paper: 4
    window: int = 16  # not in the paper: each frame attends to frames i-window .. i+window
    step: int = 4  # paper: nearest-neighbour downsample with step 4
    full_layers: int = 8  # paper: 8
    use_local: bool = True  # False: Tab. 7 row 1, frames straight into the full-attention transformer
    rope: bool = True  # RoPE over the frame / word index inside attention
    rope_theta: float = 10000.0
    dropout: float = 0.1
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.step < 1 or self.window < 0:
            raise ValueError(f"hierarchical encoder: step must be >= 1 and window >= 0, "
                             f"got step={self.step}, window={self.window}")


def _rope(n: int, head_dim: int, theta: float, device):  # -> cos, sin (n, head_dim) fp32
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)  # (n, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (n, hd): rotate_half layout
    return emb.cos(), emb.sin()


def _apply_rope(x, cos, sin):  # x (B, h, n, hd), cos/sin (n, hd): the LLM's rotation, in fp32
    return apply_rope(x.float(), cos[None], sin[None]).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"hierarchical encoder: dim {dim} must split into {heads} heads of even size")
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x, mask, rope=None):  # x (B, n, D), mask (B, 1, n, n) bool True = attend
        B, n, D = x.shape
        q, k, v = (proj(x).view(B, n, self.heads, D // self.heads).transpose(1, 2)  # (B, h, n, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, n, D))  # (B, n, D)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: HierarchicalConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, rope=None):
        x = x + self.drop(self.attn(self.norm1(x), mask, rope))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: HierarchicalConfig, n_layers: int):
        super().__init__()
        self.rope, self.theta = cfg.rope, cfg.rope_theta
        self.head_dim = cfg.dim // cfg.heads
        self.layers = nn.ModuleList(Block(cfg) for _ in range(n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, mask):  # x (B, n, D), mask (B, 1, n, n) -> (B, n, D), and what entered the last layer
        rope = _rope(x.shape[1], self.head_dim, self.theta, x.device) if self.rope else None
        penultimate = x
        for layer in self.layers:
            penultimate = x
            x = layer(x, mask, rope)
        return self.norm(x), penultimate


def local_attention_mask(frame_mask, window: int):  # (B, T) -> (B, 1, T, T) bool
    """Frame i attends to valid frames j with |i - j| <= window, and always to itself: a padded
    frame then still has one key, so SDPA never sees an empty row (which gives NaN)."""
    T = frame_mask.shape[1]
    idx = torch.arange(T, device=frame_mask.device)
    band = (idx[:, None] - idx[None, :]).abs() <= window  # (T, T)
    eye = idx[:, None] == idx[None, :]
    return ((band & frame_mask[:, None, :]) | eye)[:, None]  # (B, 1, T, T)


class HierarchicalEncoder(nn.Module):
    """(frame_features (B, T, D_in), frame_mask (B, T) True = valid, right-padded)
    -> word_features (B, N, D) with N = ceil(T/step), word_mask (B, N), sentence_embedding (B, D),
    sentence_features (B, N, D): the full-attention transformer's penultimate layer at the word
    positions (Tab. 8 row 1's "sentence-level features": each sees the whole clip)."""

    def __init__(self, cfg: HierarchicalConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.input_dim, cfg.dim)
        self.use_local = cfg.use_local and cfg.local_layers > 0
        self.local = Transformer(cfg, cfg.local_layers) if self.use_local else None
        self.query = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.full = Transformer(cfg, cfg.full_layers)

    def forward(self, frame_features, frame_mask=None):
        B, T, _ = frame_features.shape
        if frame_mask is None:
            frame_mask = torch.ones(B, T, dtype=torch.bool, device=frame_features.device)
        frame_mask = frame_mask.bool()
        x = self.input_proj(frame_features)  # (B, T, D)
        if self.use_local:
            x = self.local(x, local_attention_mask(frame_mask, self.cfg.window))[0]  # (B, T, D)
        words = x[:, ::self.cfg.step]  # (B, ceil(T/step), D): frames 0, step, 2*step, ...
        word_mask = frame_mask[:, ::self.cfg.step]  # (B, N)
        h = torch.cat([self.query.expand(B, -1, -1).to(words.dtype), words], dim=1)  # (B, 1+N, D)
        keys = torch.cat([word_mask.new_ones(B, 1), word_mask], dim=1)  # (B, 1+N): the query is always a key
        h, before_last = self.full(h, keys[:, None, None, :])  # (B, 1+N, D) each
        return words, word_mask, h[:, 0], before_last[:, 1:]


# ----------------------------------------------------------------------------- text encoder (mBART)
# "We employ the pretrained text encoder from mBART due to its multilingual capability."
# Numerics follow transformers' MBartEncoder; the sentence embedding is the state at the
# language code that closes `tokens </s> lang_code`, as GFSLT-VLP does.

@dataclass
class TextEncoderConfig:
    vocab_size: int = 250027  # defaults: facebook/mbart-large-cc25
    d_model: int = 1024
    encoder_layers: int = 12
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = True
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    pool: str = "lang_code"  # or "mean": masked mean of the final states (tiny from-scratch encoders)

    @classmethod
    def from_hf(cls, d: dict, pool: str | None = None) -> "TextEncoderConfig":
        pool = pool or d.get("pool", "lang_code")
        if pool not in ("lang_code", "mean"):
            raise ValueError(f"text encoder pool must be 'lang_code' or 'mean', got {pool!r}")
        return cls(vocab_size=d["vocab_size"], d_model=d["d_model"], encoder_layers=d["encoder_layers"],
                   encoder_attention_heads=d["encoder_attention_heads"], encoder_ffn_dim=d["encoder_ffn_dim"],
                   max_position_embeddings=d["max_position_embeddings"],
                   activation_function=d.get("activation_function", "gelu"),
                   scale_embedding=d.get("scale_embedding", False), pad_token_id=d.get("pad_token_id", 1),
                   pool=pool)

    def to_hf(self) -> dict:
        return {"model_type": "mbart", "architectures": ["MBartModel"], "vocab_size": self.vocab_size,
                "d_model": self.d_model, "encoder_layers": self.encoder_layers,
                "encoder_attention_heads": self.encoder_attention_heads, "encoder_ffn_dim": self.encoder_ffn_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "activation_function": self.activation_function, "scale_embedding": self.scale_embedding,
                "pad_token_id": self.pad_token_id, "pool": self.pool}


class MBartSelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        D = cfg.d_model
        self.heads = cfg.encoder_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, mask):  # x (B, T, D), mask (B, 1, 1, T) bool
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, h, T, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MBartEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = MBartSelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.act = _activation(cfg.activation_function)

    def forward(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


def _right_pad(rows, pad_id: int) -> tuple:
    """Token id lists -> input_ids (B, T) right-padded with pad_id, attention_mask (B, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = True
    return input_ids, attention_mask


class TextEncoder(nn.Module):
    """mBART encoder: enc(input_ids (B, T), attention_mask (B, T)) -> states (B, T, D).

    Names are the checkpoint's minus the `model.encoder.` prefix (embed_tokens, embed_positions,
    layernorm_embedding, layers.{i}.*, layer_norm). Frozen in VCP.
    """

    def __init__(self, config: TextEncoderConfig, tokenizer=None, path: str = ""):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer  # tokenizers.Tokenizer or None
        self.path = path  # the folder it came from, recorded in the VCP config
        D = config.d_model
        self.embed_scale = math.sqrt(D) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, D)  # mBART offsets positions by 2
        self.layernorm_embedding = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(MBartEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        for m in self.modules():  # transformers' MBart init (std 0.02), for fresh demo encoders
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embed_tokens.weight[config.pad_token_id].zero_()

    def forward(self, input_ids, attention_mask=None):  # (B, T) -> (B, T, D)
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"text encoder: {T} tokens, at most {self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, D)
        x = x + self.embed_positions(torch.arange(T, device=input_ids.device) + 2)
        x = self.layernorm_embedding(x)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding is never a key
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x)

    def sentence_embedding(self, input_ids, attention_mask):  # (B, T) -> (B, D)
        """The state at the last valid position (the language code), or the masked mean."""
        states = self(input_ids, attention_mask)  # (B, T, D)
        mask = attention_mask.bool()
        if self.config.pool == "mean":
            w = mask.to(states.dtype)[..., None]  # (B, T, 1)
            return (states * w).sum(1) / w.sum(1).clamp(min=1)
        last = mask.long().sum(1).clamp(min=1) - 1  # (B,) right padding
        return states[torch.arange(states.shape[0], device=states.device), last]

    def tokenize(self, texts, lang: str = "de_DE", max_length: int | None = None):
        """texts -> (input_ids, attention_mask) (B, T), each `tokens </s> lang`, right-padded."""
        if self.tokenizer is None:
            raise ValueError("text encoder has no tokenizer (its folder had no tokenizer.json)")
        tok = self.tokenizer
        eos, code = tok.token_to_id("</s>"), tok.token_to_id(lang)
        if eos is None:
            raise ValueError(f"{self.path or 'tokenizer'}: no </s> token; not an mBART tokenizer")
        if code is None:
            raise ValueError(f"{self.path or 'tokenizer'}: no language code {lang!r}; "
                             "mBART codes look like de_DE, zh_CN")
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("text encoder: no texts to tokenize")
        max_length = max_length or self.config.max_position_embeddings
        rows = []
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise ValueError(f"text encoder: text {i} is empty")
            ids = tok.encode(text, add_special_tokens=False).ids[:max_length - 2]
            rows.append(ids + [eos, code])
        return _right_pad(rows, self.config.pad_token_id)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu",
                        pool: str | None = None) -> "TextEncoder":
        """An mBART folder (mbart-large-cc25 / -50, or MBartModel.save_pretrained); decoder ignored."""
        config = TextEncoderConfig.from_hf(_read_config(folder), pool)
        tokenizer = None
        tok_path = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(tok_path):
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(tok_path)
            tokenizer.no_padding()  # tokenize() pads and truncates itself
            tokenizer.no_truncation()
        with torch.device(device):
            model = cls(config, tokenizer, path=folder).to(dtype)

        def name(k):  # checkpoint key -> our key, or None when it is not the encoder's
            k = k.removeprefix("model.")
            if k == "shared.weight":
                return "shared"
            return k.removeprefix("encoder.") if k.startswith("encoder.") else None

        raw, source, where = _read_checkpoint(folder, keep=lambda k: name(k) is not None)
        tensors = {name(k): v for k, v in raw.items()}
        source = {name(k): v for k, v in source.items()}
        # encoder.embed_tokens is tied to shared; a checkpoint may hold either or both
        shared = tensors.pop("shared", None)
        if "embed_tokens.weight" not in tensors and shared is not None:
            tensors["embed_tokens.weight"], source["embed_tokens.weight"] = shared, source["shared"]
        _load_strict(model, tensors, source, where)
        return model.eval()

    def save_pretrained(self, folder: str):
        """config.json + model.safetensors (encoder.*, shared.weight) + tokenizer.json; from_pretrained reads it."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.config.to_hf(), f, indent=2)
        sd = {f"encoder.{k}": v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
        save_file(sd, os.path.join(folder, "model.safetensors"))
        if self.tokenizer is not None:
            self.tokenizer.save(os.path.join(folder, "tokenizer.json"))


class LLMTextEncoder(nn.Module):
    """Tab. 7 row 6: a decoder LLM (Qwen-2.5-0.5B in the paper) as VCP's frozen text supervisor.
    The sentence embedding is the mean of its last hidden states over the sentence's tokens.
    The interface is TextEncoder's (tokenize, sentence_embedding, config.d_model, path)."""

    def __init__(self, llm: LLM, tokenizer: Tokenizer, path: str = ""):
        super().__init__()
        self.llm, self.tokenizer, self.path = llm, tokenizer, path
        self.config = TextEncoderConfig(d_model=llm.config.hidden_size, pad_token_id=tokenizer.pad_token_id or 0,
                                        max_position_embeddings=llm.config.max_position_embeddings, pool="mean")

    def tokenize(self, texts, lang: str = "", max_length: int | None = None):
        """texts -> (input_ids, attention_mask) (B, T), right-padded; `lang` is unused (no codes)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise ValueError(f"text encoder: text {i} is empty")
            rows.append(self.tokenizer.encode(text)[:max_length or self.config.max_position_embeddings])
        return _right_pad(rows, self.config.pad_token_id)

    def sentence_embedding(self, input_ids, attention_mask):  # (B, T) -> (B, D)
        states = self.llm(input_ids, attention_mask=attention_mask, hidden_states=True)  # (B, T, D)
        w = attention_mask.to(states.dtype)[..., None]  # (B, T, 1)
        return (states * w).sum(1) / w.sum(1).clamp(min=1)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu") -> "LLMTextEncoder":
        llm = LLM.from_pretrained(folder, dtype=dtype, device=device).requires_grad_(False)
        return cls(llm, Tokenizer.from_pretrained(folder), path=folder).eval()


def load_text_encoder(folder: str, dtype=torch.float32, device="cpu"):
    """VCP's frozen text supervisor from a folder: mBART (the paper) or a Qwen2/Llama LLM (Tab. 7 row 6)."""
    kind = _read_config(checkpoint_folder(folder)).get("model_type")
    if kind in ("qwen2", "llama"):
        return LLMTextEncoder.from_pretrained(folder, dtype=dtype, device=device)
    return TextEncoder.from_pretrained(folder, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- VCP model
# Section 3.2: ViT (+LoRA) per frame -> hierarchical encoder -> sentence embedding projected
# into a 768-d CLIP space, against the frozen mBART sentence embedding projected into the
# same space; a learnable logit scale (CLIP: init 1/0.07, at most 100). The training script
# only adds the losses.

@dataclass
class VCPConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)  # DINOv2 ViT-B/14 shape
    vit_path: str = ""  # a DINOv2 folder: its config replaces `vit` and its weights load
    image_size: int = 336  # input frames (paper: 336 px)
    # how frames are prepared for this encoder (paper section C); VLT and eval read them from here
    resize: int = 384  # centre square crop resized to this, then cropped to image_size
    max_frames: int = 256
    stride: int = 1  # temporal stride before subsampling to max_frames
    vit_tuning: str = "lora"  # lora (paper: base frozen, adapters trained) | full | frozen
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_targets: tuple = ("query", "value")
    frame_pool: str = "cls"  # cls (paper) | flat (all patch tokens, concatenated, projected)
    vit_chunk_size: int = 64  # frames per ViT call
    grad_checkpointing: bool = False
    hier: HierarchicalConfig = field(default_factory=HierarchicalConfig)
    clip_dim: int = 768
    text_dim: int = 1024  # mBART-large d_model; set from the text encoder when one is given
    text_encoder_path: str = ""  # relative to the VCP folder (or absolute)
    logit_scale_init: float = 1 / 0.07  # the multiplier, as CLIP
    logit_scale_max: float = 100.0

    def __post_init__(self):
        if self.vit_tuning not in ("lora", "full", "frozen"):
            raise ValueError(f"vit_tuning must be lora, full or frozen, got {self.vit_tuning!r}")
        if self.frame_pool not in ("cls", "flat"):
            raise ValueError(f"frame_pool must be cls or flat, got {self.frame_pool!r}")
        self.lora_targets = tuple(self.lora_targets)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "VCPConfig":
        def build(klass, values, prefix):
            known = {f.name for f in fields(klass)}
            for k in values:
                if k not in known:
                    raise ValueError(f"{where}: unknown key {prefix}{k}; valid: {sorted(known)}")
            return klass(**values)
        d = dict(d)
        d["vit"] = build(ViTConfig, d.get("vit", {}), "vit.")
        d["hier"] = build(HierarchicalConfig, d.get("hier", {}), "hier.")
        return build(cls, d, "")


class VCPModel(nn.Module):
    def __init__(self, cfg: VCPConfig, text_encoder: TextEncoder | None = None):
        super().__init__()
        if cfg.vit_path:
            self.vit = ViT.from_pretrained(cfg.vit_path, chunk_size=cfg.vit_chunk_size,
                                           grad_checkpointing=cfg.grad_checkpointing)
            cfg = replace(cfg, vit=self.vit.config)
        else:
            self.vit = ViT(cfg.vit, chunk_size=cfg.vit_chunk_size, grad_checkpointing=cfg.grad_checkpointing)
        if cfg.vit_tuning in ("lora", "frozen"):
            self.vit.requires_grad_(False)
        if self.vit.embeddings.mask_token is not None:
            # used only by DINOv2's masked-image pretraining: a trainable parameter that never
            # gets a gradient would stop DDP (unused parameters)
            self.vit.embeddings.mask_token.requires_grad_(False)
        if cfg.vit_tuning == "lora":
            self.vit.add_lora(cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        D = cfg.vit.hidden_size
        if cfg.frame_pool == "flat":
            grid = cfg.image_size // cfg.vit.patch_size
            self.frame_proj = nn.Linear(grid * grid * D, D)
        # the hierarchical encoder reads frame features, whose width is the ViT's
        cfg = replace(cfg, hier=replace(cfg.hier, input_dim=D))
        if text_encoder is not None:
            cfg = replace(cfg, text_dim=text_encoder.config.d_model, text_encoder_path=text_encoder.path)
        self.cfg = cfg
        self.hier = HierarchicalEncoder(cfg.hier)
        self.video_proj = nn.Linear(cfg.hier.dim, cfg.clip_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.clip_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        self.text_encoder = text_encoder
        if text_encoder is not None:
            text_encoder.requires_grad_(False)
            text_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()  # frozen teacher: no dropout, ever
        return self

    def frame_features(self, pixel_values):  # (N, 3, H, W) -> (N, D)
        if self.cfg.frame_pool == "cls":
            return self.vit(pixel_values)
        tokens = self.vit(pixel_values, all_tokens=True)[:, self.vit.num_prefix_tokens:]  # (N, h*w, D)
        if tokens.shape[1] * tokens.shape[2] != self.frame_proj.in_features:
            raise ValueError(f"frame_pool flat: frames of {tuple(pixel_values.shape[-2:])} px do not match "
                             f"image_size {self.cfg.image_size}")
        return self.frame_proj(tokens.flatten(1))  # (N, D)

    def encode_video(self, frames, frame_mask=None) -> dict:
        """frames (B, T, 3, H, W) normalised, frame_mask (B, T) True = valid (right-padded)."""
        B, T = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
        frame_mask = frame_mask.bool()
        feats = self.frame_features(frames[frame_mask])  # (N_valid, D): padding never enters the ViT
        frame_features = feats.new_zeros(B, T, feats.shape[-1])
        frame_features = frame_features.masked_scatter(frame_mask[..., None], feats)  # (B, T, D), zeros at padding
        words, word_mask, sentence, sentence_features = self.hier(frame_features, frame_mask)
        return dict(frame_features=frame_features, word_features=words, word_mask=word_mask,
                    sentence_embedding=sentence, sentence_features=sentence_features,
                    video_emb=self.video_proj(sentence))

    def encode_text(self, text_ids=None, text_mask=None, text_sentence=None):  # -> (B, clip_dim)
        """Token ids through the frozen text encoder, or its sentence embeddings (B, text_dim)
        computed beforehand: the teacher is frozen, so the VCP script encodes every sentence once."""
        if text_sentence is None:
            if self.text_encoder is None:
                raise ValueError("VCPModel has no text encoder; pass one, or load with with_text_encoder=True")
            with torch.no_grad():
                text_sentence = self.text_encoder.sentence_embedding(text_ids, text_mask)  # (B, text_dim)
        return self.text_proj(text_sentence.to(self.text_proj.weight.dtype))

    def forward(self, frames, frame_mask, text_ids=None, text_mask=None, text_sentence=None) -> dict:
        out = self.encode_video(frames, frame_mask)
        out["text_emb"] = self.encode_text(text_ids, text_mask, text_sentence)
        out["logit_scale"] = self.clip_scale()
        return out

    def clip_scale(self):
        """The multiplier of the CLIP logits: exp of the learnt log, never over logit_scale_max (CLIP: 100)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.logit_scale_max)).exp()

    def save(self, folder: str):
        """config.json (every sub-config, the text encoder folder) + model.safetensors (all but the text encoder)."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
              if not k.startswith("text_encoder.")}
        save_file(sd, os.path.join(folder, "model.safetensors"))
        d = asdict(self.cfg)
        d["lora_targets"] = list(self.cfg.lora_targets)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(d, f, indent=2)

    @classmethod
    def load(cls, folder: str, with_text_encoder: bool = False, dtype=torch.float32, device="cpu") -> "VCPModel":
        folder = checkpoint_folder(folder)  # a save cut by a kill: its last whole checkpoint
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: not found; a VCP folder holds config.json and model.safetensors")
        cfg = VCPConfig.from_dict(read_json(cfg_path), where=cfg_path)
        text_encoder = None
        if with_text_encoder:
            if not cfg.text_encoder_path:
                raise ValueError(f"{cfg_path}: text_encoder_path is empty; "
                                 "this model was saved without a text encoder")
            # a relative path is relative to this folder (train_vcp.py writes it so)
            path = os.path.join(folder, cfg.text_encoder_path)
            text_encoder = load_text_encoder(path, dtype=dtype, device=device)
        # the ViT weights are in model.safetensors: do not read vit_path again
        with torch.device(device):
            model = cls(replace(cfg, vit_path=""), text_encoder).to(dtype)
        model.cfg = replace(model.cfg, vit_path=cfg.vit_path, text_encoder_path=cfg.text_encoder_path)
        tensors, source, where = _read_checkpoint(folder, keep=lambda k: True)
        _load_strict(model, tensors, source, where, skip=lambda k: k.startswith("text_encoder."))
        return model
