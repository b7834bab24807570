"""The visual side of LLaVA-SLT: visual contrastive pretraining (VCP, paper section 3.2).

Reads top to bottom: ViT (DINOv2) -> HierarchicalEncoder (frame -> word -> sentence, Fig. 4) ->
TextEncoder (the frozen mBART encoder that supervises VCP; or an LLM, Tab. 7) -> VCPModel (ViT +
LoRA + hierarchical encoder + projections into the CLIP space). Parameter names equal the public
checkpoints', so loading is a loop over keys; the files themselves are hf.py's business."""

import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hf
from errors import UserError
from model import LLM, apply_lora, apply_rope, rope_tables
from tokenizer import Tokenizer

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
                **dict.fromkeys(("gelu_new", "gelu_pytorch_tanh"), lambda x: F.gelu(x, approximate="tanh"))}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise UserError(f"activation {name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _self_attention(x, projections, heads: int, mask=None, rope=None, dropout=0.0, n_queries=None):
    """Multi-head self-attention of x (B, L, D) through the linear layers (q, k, v, out), for every
    encoder here; n_queries: the first n tokens' outputs only (every token is still a key and value)."""
    (q, k, v, out), (B, _, D) = projections, x.shape
    qs, ks, vs = (t.view(B, -1, heads, D // heads).transpose(1, 2)  # (B, h, L or Lq, hd)
                  for t in (q(x if n_queries is None else x[:, :n_queries]), k(x), v(x)))
    if rope is not None:
        qs, ks = _apply_rope(qs, *rope), _apply_rope(ks, *rope)
    y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout)  # (B, h, Lq, hd)
    return out(y.transpose(1, 2).reshape(B, qs.shape[2], D))  # (B, Lq, D)


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

    @property
    def registers(self) -> bool:
        return self.model_type == "dinov2_with_registers"


class ViTEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D, grid, p = config.hidden_size, config.image_size // config.patch_size, config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # unused here (masked-image pretraining only), kept so checkpoints load strictly
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if config.use_mask_token else None
        self.patch_embeddings = nn.ModuleDict(dict(projection=nn.Conv2d(config.num_channels, D, p, stride=p)))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))
        if config.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, D))

    def position_embedding(self, n_patches: int, height: int, width: int):  # -> (1, 1 + n_patches, D)
        """The checkpoint's patch grid resized as transformers does: to (H/p, W/p), bicubic, in fp32."""
        pos = self.position_embeddings
        n_positions = pos.shape[1] - 1
        if n_patches == n_positions and height == width:
            return pos
        p, D = self.config.patch_size, pos.shape[-1]
        side = int(math.sqrt(n_positions))
        grid = pos[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
        # bicubic in half precision shifts the embeddings, so resample in fp32
        grid = F.interpolate(grid.float(), size=(height // p, width // p), mode="bicubic",
                             align_corners=False, antialias=self.config.registers).to(pos.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D)  # (1, h*w, D)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values):  # (N, 3, H, W) -> (N, 1 + R + h*w, D)
        N, _, H, W = pixel_values.shape
        projection = self.patch_embeddings.projection
        x = projection(pixel_values.to(projection.weight.dtype)).flatten(2).transpose(1, 2)  # (N, h*w, D)
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)  # (N, 1 + h*w, D)
        x = x + self.position_embedding(x.shape[1] - 1, H, W)
        if self.config.registers:  # token order [CLS, registers, patches]; registers carry no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]], dim=1)
        return x


class ViTMLP(nn.Module):  # fc1 -> act -> fc2, or dinov2-giant's SwiGLU: weights_in (gate, up stacked) -> weights_out
    def __init__(self, config: ViTConfig):
        super().__init__()
        D, hidden, self.swiglu = config.hidden_size, int(config.hidden_size * config.mlp_ratio), config.use_swiglu_ffn
        if self.swiglu:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
            self.weights_in, self.weights_out = nn.Linear(D, 2 * hidden), nn.Linear(hidden, D)
        else:
            self.fc1, self.fc2, self.act = nn.Linear(D, hidden), nn.Linear(hidden, D), _activation(config.hidden_act)

    def forward(self, x):
        if not self.swiglu:
            return self.fc2(self.act(self.fc1(x)))
        gate, up = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * up)


class ViTLayer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        D, bias, scale = config.hidden_size, config.qkv_bias, float(config.layerscale_value)
        self.heads = config.num_attention_heads
        self.norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        # attention.attention.query ... attention.output.dense, layer_scale1.lambda1: the checkpoints' nesting
        qkv = nn.ModuleDict({name: nn.Linear(D, D, bias=bias) for name in ("query", "key", "value")})
        self.attention = nn.ModuleDict(dict(attention=qkv, output=nn.ModuleDict(dict(dense=nn.Linear(D, D)))))
        self.layer_scale1 = nn.ParameterDict(dict(lambda1=nn.Parameter(torch.full((D,), scale))))
        self.norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config)
        self.layer_scale2 = nn.ParameterDict(dict(lambda1=nn.Parameter(torch.full((D,), scale))))

    def forward(self, x, n_queries: int | None = None):  # (N, L, D) -> (N, L or n_queries, D)
        """n_queries: the outputs of the first n tokens only (every token is still attended to)."""
        projections = (*self.attention.attention.values(), self.attention.output.dense)  # query, key, value, dense
        h = _self_attention(self.norm1(x), projections, self.heads, n_queries=n_queries)
        x = (x if n_queries is None else x[:, :n_queries]) + h * self.layer_scale1.lambda1
        return x + self.mlp(self.norm2(x)) * self.layer_scale2.lambda1


class ViT(nn.Module):
    """DINOv2 backbone: (N, 3, H, W) ImageNet-normalised, H and W multiples of the patch, -> CLS (N, D),
    `chunk_size` frames at a time. `grad_checkpointing` keeps only a chunk's output for the backward pass
    (per frame the CLS feature; per-layer checkpointing would keep the residual stream at 12 layer
    boundaries, 21.75 MiB per 336 px ViT-B/14 frame) and recomputes the chunk there (--vit_chunk_size)."""

    def __init__(self, config: ViTConfig, chunk_size: int = 64, grad_checkpointing: bool = False):
        super().__init__()
        self.config, self.chunk_size, self.grad_checkpointing = config, chunk_size, grad_checkpointing
        self.embeddings = ViTEmbeddings(config)
        layers = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layer=layers))  # encoder.layer.{i}: the checkpoints' nesting
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # transformers' Dinov2 init: truncated normal 0.02 for linear/conv/tokens, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=0.02)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=0.02)

    @property
    def num_prefix_tokens(self) -> int:  # CLS plus registers: the tokens before the patches
        return 1 + self.config.num_register_tokens

    def _run(self, pixel_values, cls_only: bool = False):  # (n, 3, H, W) -> (n, L, D), or (n, 1, D) cls_only
        x = self.embeddings(pixel_values)
        layers = list(self.encoder.layer)
        for layer in layers[:-1] if cls_only else layers:
            x = layer(x)
        return self.layernorm(self._last_layer_cls_only(x) if cls_only and layers else x)

    def _last_layer_cls_only(self, x):  # (n, L, D) -> (n, 1, D)
        # Fast path (bench.py vit_ratio): the patch tokens' attention output and MLP of the last layer
        # would be thrown away; computing CLS's alone saves ~7% of a 12-layer ViT's FLOPs.
        return self.encoder.layer[-1](x, n_queries=1)

    def forward(self, pixel_values, all_tokens: bool = False, chunk_size: int | None = None):
        """(N, 3, H, W) -> (N, D) CLS after the final layernorm, or (N, 1 + R + h*w, D) with all_tokens."""
        N, _, H, W = pixel_values.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise UserError(f"ViT: image size {H}x{W} is not a multiple of the patch size {p}")
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
        """A DINOv2 folder, as Dinov2Model.save_pretrained writes it (or a model with a head, ignored)."""
        config = ViTConfig(**hf.vit_config_fields(hf.read_config(folder)[0]))
        with torch.device(device):
            model = cls(config, **kwargs).to(dtype)
        hf.load_dinov2(model, folder)
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
            raise UserError(f"hierarchical encoder: step must be >= 1 and window >= 0, "
                            f"got step={self.step}, window={self.window}")


def _rope(n: int, head_dim: int, theta: float, device):  # -> cos, sin (n, head_dim) fp32: the LLM's tables
    return rope_tables(n, 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def _apply_rope(x, cos, sin):  # x (B, h, n, hd), cos/sin (n, hd): the LLM's rotation, in fp32
    return apply_rope(x.float(), cos[None], sin[None]).to(x.dtype)


class Block(nn.Module):  # pre-norm transformer block
    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        D, self.heads, self.dropout = config.dim, config.heads, config.dropout
        if D % self.heads or (D // self.heads) % 2:
            raise UserError(f"hierarchical encoder: dim {D} must split into {self.heads} heads of even size")
        self.norm1 = nn.LayerNorm(D, eps=config.norm_eps)
        self.attn = nn.ModuleDict({name: nn.Linear(D, D) for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.norm2 = nn.LayerNorm(D, eps=config.norm_eps)
        hidden = int(D * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, rope=None):  # x (B, n, D), mask (B, 1, n, n) bool True = attend
        dropout = self.dropout if self.training else 0.0
        x = x + self.drop(_self_attention(self.norm1(x), self.attn.values(), self.heads, mask, rope, dropout))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, config: HierarchicalConfig, n_layers: int):
        super().__init__()
        self.rope, self.theta, self.head_dim = config.rope, config.rope_theta, config.dim // config.heads
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, x, mask):  # x (B, n, D), mask (B, 1, n, n) -> (B, n, D), and what entered the last layer
        rope = _rope(x.shape[1], self.head_dim, self.theta, x.device) if self.rope else None
        penultimate = x
        for layer in self.layers:
            penultimate = x
            x = layer(x, mask, rope)
        return self.norm(x), penultimate


def local_attention_mask(frame_mask, window: int):  # (B, T) -> (B, 1, T, T) bool
    """Frame i attends to valid frames j, |i - j| <= window, and to itself (SDPA gives NaN for a keyless row)."""
    idx = torch.arange(frame_mask.shape[1], device=frame_mask.device)
    band = (idx[:, None] - idx[None, :]).abs() <= window  # (T, T)
    return ((band & frame_mask[:, None, :]) | (idx[:, None] == idx[None, :]))[:, None]  # (B, 1, T, T)


class HierarchicalEncoder(nn.Module):
    """(frame_features (B, T, D_in), frame_mask (B, T) True = valid, right-padded) -> word_features
    (B, N = ceil(T/step), D), word_mask (B, N), sentence_embedding (B, D), sentence_features (B, N, D):
    the full-attention transformer's penultimate layer at the word positions (Tab. 8 row 1)."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.input_dim, config.dim)
        self.use_local = config.use_local and config.local_layers > 0
        self.local = Transformer(config, config.local_layers) if self.use_local else None
        self.query = nn.Parameter(torch.randn(1, 1, config.dim) * 0.02)
        self.full = Transformer(config, config.full_layers)

    def forward(self, frame_features, frame_mask=None):
        B, T, _ = frame_features.shape
        frame_mask = frame_features.new_ones(B, T, dtype=torch.bool) if frame_mask is None else frame_mask.bool()
        x = self.input_proj(frame_features)  # (B, T, D)
        if self.use_local:
            x = self.local(x, local_attention_mask(frame_mask, self.config.window))[0]  # (B, T, D)
        step = self.config.step  # words: frames 0, step, 2 * step ...: (B, N = ceil(T / step), D)
        words, word_mask = x[:, ::step], frame_mask[:, ::step]
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


class MBartEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        D, self.heads = config.d_model, config.encoder_attention_heads
        self.self_attn = nn.ModuleDict({name: nn.Linear(D, D) for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.self_attn_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(D, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, D)
        self.final_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.act = _activation(config.activation_function)

    def forward(self, x, mask):  # x (B, T, D), mask (B, 1, 1, T) bool
        x = x + _self_attention(self.self_attn_layer_norm(x), self.self_attn.values(), self.heads, mask)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


def _tokenize(texts, encode, pad_id: int) -> tuple:
    """A text or a list of texts -> (input_ids, attention_mask) (B, T): encode(text), right-padded with pad_id."""
    texts = [texts] if isinstance(texts, str) else texts
    if not texts:
        raise UserError("text encoder: no texts to tokenize")
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise UserError(f"text encoder: text {i} is empty")
    rows = [torch.tensor(encode(text), dtype=torch.long) for text in texts]
    input_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)  # (B, T)
    return input_ids, torch.arange(input_ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]


class TextEncoder(nn.Module):
    """mBART encoder: enc(input_ids (B, T), attention_mask (B, T)) -> states (B, T, D). Names are
    the checkpoint's minus `model.encoder.`. Frozen in VCP."""

    def __init__(self, config: TextEncoderConfig, tokenizer=None, path: str = ""):
        super().__init__()
        # tokenizer: a tokenizers.Tokenizer or None; path: the folder it came from, recorded in the VCP config
        self.config, self.tokenizer, self.path = config, tokenizer, path
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
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise UserError(f"text encoder: {T} tokens, at most {self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, D)
        x = self.layernorm_embedding(x + self.embed_positions(torch.arange(T, device=input_ids.device) + 2))
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
            raise UserError("text encoder has no tokenizer (its folder had no tokenizer.json)")
        eos, code = self.tokenizer.token_to_id("</s>"), self.tokenizer.token_to_id(lang)
        if eos is None:
            raise UserError(f"{self.path or 'tokenizer'}: no </s> token; not an mBART tokenizer")
        if code is None:
            raise UserError(f"{self.path or 'tokenizer'}: no language code {lang!r}; "
                            "mBART codes look like de_DE, zh_CN")
        n = (max_length or self.config.max_position_embeddings) - 2
        return _tokenize(texts, lambda t: self.tokenizer.encode(t, add_special_tokens=False).ids[:n] + [eos, code],
                         self.config.pad_token_id)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu", pool: str | None = None) -> "TextEncoder":
        """An mBART folder (mbart-large-cc25 / -50, or MBartModel.save_pretrained); decoder ignored."""
        config = TextEncoderConfig(**hf.text_encoder_config_fields(hf.read_config(folder)[0], pool))
        tokenizer = hf.read_tokenizer(folder)
        with torch.device(device):
            model = cls(config, tokenizer, path=folder).to(dtype)
        hf.load_mbart_encoder(model, folder)
        return model.eval()

    def save_pretrained(self, folder: str):
        """config.json + model.safetensors (encoder.*, shared.weight) + tokenizer.json; from_pretrained reads it."""
        hf.save_mbart_encoder(self, folder)


class LLMTextEncoder(nn.Module):
    """Tab. 7 row 6: a decoder LLM (Qwen-2.5-0.5B in the paper) as VCP's frozen text supervisor, with
    TextEncoder's interface; the sentence embedding is the mean of its last hidden states."""

    def __init__(self, llm: LLM, tokenizer: Tokenizer, path: str = ""):
        super().__init__()
        self.llm, self.tokenizer, self.path = llm, tokenizer, path
        self.config = TextEncoderConfig(d_model=llm.config.hidden_size, pad_token_id=tokenizer.pad_token_id or 0,
                                        max_position_embeddings=llm.config.max_position_embeddings, pool="mean")

    def tokenize(self, texts, lang: str = "", max_length: int | None = None):
        """texts -> (input_ids, attention_mask) (B, T), right-padded; `lang` is unused (no codes)."""
        n = max_length or self.config.max_position_embeddings
        return _tokenize(texts, lambda text: self.tokenizer.encode(text)[:n], self.config.pad_token_id)

    def sentence_embedding(self, input_ids, attention_mask):  # (B, T) -> (B, D)
        states = self.llm(input_ids, attention_mask=attention_mask, hidden_states=True)  # (B, T, D)
        w = attention_mask.to(states.dtype)[..., None]  # (B, T, 1)
        return (states * w).sum(1) / w.sum(1).clamp(min=1)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu") -> "LLMTextEncoder":
        llm = LLM.from_pretrained(folder, dtype=dtype, device=device).requires_grad_(False)
        return cls(llm, Tokenizer.from_pretrained(folder), path=folder).eval()


def text_encoder_from_llm(folder: str, lang_codes, embeddings: str = "llm") -> TextEncoder:
    """A teacher for from-scratch demos: a bag of words over the LLM's vocabulary, mean-pooled.

    Sentences sharing words land close together, which a random frozen encoder does not give.
    embeddings="llm": the trained LLM's token embeddings; "random": a fixed random vector per
    token (seeded), so every word is as far from every other. A small LM trained from scratch
    puts words that share contexts together (the synthetic language's warm/kalt: cosine 0.97),
    and a teacher that cannot tell two sentences apart gives VCP no reason to either.
    lang_codes: mBART's language codes, added to the tokenizer as mBART has them.
    """
    folder = hf.checkpoint_folder(folder)
    path = os.path.join(folder, "model.safetensors")
    embed = hf.read_safetensors(path, keep=lambda k: k == "model.embed_tokens.weight").get("model.embed_tokens.weight")
    if embed is None:
        raise UserError(f"{path}: no model.embed_tokens.weight; --text_from_llm takes a Qwen2/Llama folder")
    if embeddings == "random":
        embed = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0))
    elif embeddings != "llm":
        raise UserError(f"teacher embeddings must be llm or random, got {embeddings!r}")
    return bag_of_words(Tokenizer.from_pretrained(folder), embed.float(), lang_codes)


def text_encoder_from_words(texts, dim: int, lang_codes) -> TextEncoder:
    """The demo's teacher, needing no other stage (as the paper's mBART needs none): one fixed
    random vector (seeded) per word of `texts`, mean-pooled; a word it never saw is <|unk|>."""
    tok = Tokenizer.train(texts, kind="wordlevel")
    return bag_of_words(tok, torch.randn(len(tok), dim, generator=torch.Generator().manual_seed(0)), lang_codes)


def bag_of_words(tok, embed, lang_codes) -> TextEncoder:
    """An mBART-format encoder with no layers over `tok`'s words, `embed` (V, D) its token vectors,
    so the rest of the pipeline (saving, loading, VLT) is unchanged."""
    backend = tok.backend
    backend.add_special_tokens(["</s>", *lang_codes])
    encoder_config = TextEncoderConfig(vocab_size=backend.get_vocab_size(with_added_tokens=True),
                                       d_model=embed.shape[1], encoder_layers=0, encoder_attention_heads=1,
                                       encoder_ffn_dim=embed.shape[1], max_position_embeddings=512,
                                       scale_embedding=False, pad_token_id=tok.pad_token_id, pool="mean")
    enc = TextEncoder(encoder_config, backend, path="")
    with torch.no_grad():
        enc.embed_tokens.weight.zero_()  # the tokens added above: in every sentence, so they carry nothing
        enc.embed_tokens.weight[:embed.shape[0]] = embed
        enc.embed_positions.weight.zero_()  # a bag of words: order is what the video must supply
    return enc.requires_grad_(False).eval()


def load_text_encoder(folder: str, dtype=torch.float32, device="cpu"):
    """VCP's frozen text supervisor from a folder: mBART (the paper) or a Qwen2/Llama LLM (Tab. 7 row 6)."""
    if hf.read_config(hf.checkpoint_folder(folder))[0].get("model_type") in ("qwen2", "llama"):
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
            raise UserError(f"vit_tuning must be lora, full or frozen, got {self.vit_tuning!r}")
        if self.frame_pool not in ("cls", "flat"):
            raise UserError(f"frame_pool must be cls or flat, got {self.frame_pool!r}")
        self.lora_targets = tuple(self.lora_targets)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "VCPConfig":
        """A saved config.json's dict; an unknown key is an error naming `where`."""
        return hf.dataclass_from_dict(cls, d, where, vit=ViTConfig, hier=HierarchicalConfig)


class VCPModel(nn.Module):
    def __init__(self, config: VCPConfig, text_encoder: TextEncoder | None = None):
        super().__init__()
        vit_kwargs = dict(chunk_size=config.vit_chunk_size, grad_checkpointing=config.grad_checkpointing)
        if config.vit_path:
            self.vit = ViT.from_pretrained(config.vit_path, **vit_kwargs)
        else:
            self.vit = ViT(config.vit, **vit_kwargs)
        config = replace(config, vit=self.vit.config)  # a DINOv2 folder's config replaces config.vit
        if config.vit_tuning in ("lora", "frozen"):
            self.vit.requires_grad_(False)
        if self.vit.embeddings.mask_token is not None:  # a parameter never given a gradient stops DDP
            self.vit.embeddings.mask_token.requires_grad_(False)
        if config.vit_tuning == "lora":
            self.vit.add_lora(config.lora_targets, config.lora_r, config.lora_alpha, config.lora_dropout)
        D, grid = config.vit.hidden_size, config.image_size // config.vit.patch_size
        if config.frame_pool == "flat":  # every patch token of a frame, concatenated and projected
            self.frame_proj = nn.Linear(grid * grid * D, D)
        # the hierarchical encoder reads frame features, whose width is the ViT's
        config = replace(config, hier=replace(config.hier, input_dim=D))
        if text_encoder is not None:
            config = replace(config, text_dim=text_encoder.config.d_model, text_encoder_path=text_encoder.path)
        self.config = config
        self.hier = HierarchicalEncoder(config.hier)
        self.video_proj = nn.Linear(config.hier.dim, config.clip_dim)
        self.text_proj = nn.Linear(config.text_dim, config.clip_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.text_encoder = text_encoder
        if text_encoder is not None:
            text_encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()  # frozen teacher: no dropout, ever
        return self

    def frame_features(self, pixel_values):  # (N, 3, H, W) -> (N, D)
        if self.config.frame_pool == "cls":
            return self.vit(pixel_values)
        tokens = self.vit(pixel_values, all_tokens=True)[:, self.vit.num_prefix_tokens:]  # (N, h*w, D)
        if tokens.shape[1] * tokens.shape[2] != self.frame_proj.in_features:
            raise UserError(f"frame_pool flat: frames of {tuple(pixel_values.shape[-2:])} px do not match "
                            f"image_size {self.config.image_size}")
        return self.frame_proj(tokens.flatten(1))  # (N, D)

    def encode_video(self, frames, frame_mask=None) -> dict:
        """frames (B, T, 3, H, W) normalised, frame_mask (B, T) True = valid (right-padded)."""
        B, T = frames.shape[:2]
        frame_mask = frames.new_ones(B, T, dtype=torch.bool) if frame_mask is None else frame_mask.bool()
        feats = self.frame_features(frames[frame_mask])  # (N_valid, D): padding never enters the ViT
        frame_features = feats.new_zeros(B, T, feats.shape[-1])
        frame_features = frame_features.masked_scatter(frame_mask[..., None], feats)  # (B, T, D), zeros at padding
        words, word_mask, sentence, sentence_features = self.hier(frame_features, frame_mask)
        return dict(frame_features=frame_features, word_features=words, word_mask=word_mask,
                    sentence_embedding=sentence, sentence_features=sentence_features,
                    video_emb=self.video_proj(sentence))

    def encode_text(self, text_ids=None, text_mask=None, text_sentence=None):  # -> (B, clip_dim)
        """Token ids through the frozen text encoder, or its sentence embeddings (B, text_dim) computed once."""
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
        return self.logit_scale.clamp(max=math.log(self.config.logit_scale_max)).exp()

    def save(self, folder: str):
        """config.json (every sub-config, the text encoder's folder) + model.safetensors (all but the text encoder)."""
        hf.save_vcp(self, folder)

    @classmethod
    def load(cls, folder: str, with_text_encoder: bool = False, dtype=torch.float32, device="cpu") -> "VCPModel":
        folder, saved, path = hf.read_vcp_config(folder)
        config = VCPConfig.from_dict(saved, where=path)
        text_encoder = None
        if with_text_encoder:
            if not config.text_encoder_path:
                raise UserError(f"{path}: text_encoder_path is empty; this model was saved without a text encoder")
            # relative to this folder (train_vcp.py writes it so)
            text_encoder = load_text_encoder(os.path.join(folder, config.text_encoder_path), dtype=dtype, device=device)
        with torch.device(device):  # the ViT weights are in model.safetensors: vit_path is not read again
            model = cls(replace(config, vit_path=""), text_encoder).to(dtype)
        model.config = replace(model.config, vit_path=config.vit_path, text_encoder_path=config.text_encoder_path)
        hf.load_strict(model, *hf.read_weights(folder), skip=lambda k: k.startswith("text_encoder."))
        return model
