"""The language side of LLaVA-SLT (paper sections 3.1 and 3.3).

Reads top to bottom: LLMConfig -> RMSNorm -> RoPE -> KV cache -> attention -> MLP -> LLM
(Qwen2/2.5, Qwen1.5, Llama-3.x; greedy and beam search) -> LoRA -> Connector -> LLaVASLT.
Parameter names equal the public checkpoints' names, so loading is a loop over keys; the
files themselves are hf.py's business, the tokenizer and chat templates tokenizer.py's.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
from errors import UserError
from hf import copy_strict

# ----------------------------------------------------------------------------- LLM
# The decoder LLM of section 3.1 (Qwen2.5-7B-Instruct by default; Qwen1.5 and Llama-3.1 in the
# Tab. 6 ablation, Llama-3.1-8B-Instruct for Phoenix). One module family covers all three:
# they differ only in q/k/v biases, RoPE frequency scaling and tied embeddings.

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
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise UserError(f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LLMConfig":
        return hf.llm_config(cls, d, source)  # a Hugging Face config.json dict, either spelling

    def to_hf(self) -> dict:
        return hf.llm_config_json(asdict(self))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as the public checkpoints were trained.
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(config: LLMConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32 on the CPU, with the config's frequency scaling."""
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling or {}
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
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


def rope_tables(n: int, inv_freq):  # -> cos, sin (n, head_dim) fp32 of positions 0 .. n-1
    freqs = torch.arange(n, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
    return emb.cos(), emb.sin()


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
            self.cos, self.sin = rope_tables(n, self.inv_freq.to(device))
        return self.cos[position_ids].to(dtype), self.sin[position_ids].to(dtype)  # (B, T, head_dim)


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (B, T, hd)
    # Rotates halves, not interleaved pairs: the HF layout of the Qwen and Llama checkpoints.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions, so a decoding step
    writes into a slice instead of concatenating. `length` positions are filled."""

    def __init__(self, config: LLMConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, KV, S_max, hd)
        self.v, self.length = torch.zeros_like(self.k), 0

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

    def advance(self, n: int):
        self.length += n


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
        if mask is None:  # see _mask_or_none
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)  # (B, H, T, hd)
        else:
            # On CUDA, a mask together with enable_gqa falls back to the math kernel (which
            # materialises every attention matrix); repeating the KV heads keeps the fused ones.
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


def _mask_or_none(attention_mask, T: int, past: int, device):
    """Boolean (B or 1, 1, T, S) mask, True = may attend: causal, never to padding; None where SDPA's
    own causal masking (or none, for one new token) gives every real token the same output."""
    # Fast path (bench.py llm_prefill_ratio, llm_greedy_ratio): no mask keeps SDPA's fused GQA kernels.
    if past == 0 and (attention_mask is None or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
        return None  # no padding, or right padding only (training batches): no real token sees a pad
    if T == 1 and (attention_mask is None or bool(attention_mask.all())):
        return None  # a decoding step with no padding anywhere
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


class MLP(nn.Module):  # SwiGLU
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


def _eos_list(eos) -> list:  # None, an id or a list of ids
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _embedding_without_init(n: int, dim: int) -> nn.Embedding:
    # Fast path (bench.py load_peak_rss_ratio): LLM._init_weights draws it anyway, and on the meta
    # device (from_pretrained) nn.Embedding's own normal_ would import ~70 MB of torch for nothing.
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


def _cpu_decoding_logits(weight, x):  # weight (V, D), x (B, T, D) with B * T small -> (B, T, V)
    # Fast path (bench.py llm_greedy_ratio): for a few rows, BLAS streams the big head weight 1.5-2x
    # faster as the left operand (W @ x^T) than as nn.Linear's transposed right one (x @ W^T).
    B, T, D = x.shape
    return (weight @ x.reshape(B * T, D).T).T.reshape(B, T, -1).contiguous()


class LLM(nn.Module):
    """A decoder-only causal LM with the Hugging Face parameter names of Qwen2 and Llama."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=_embedding_without_init(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.tie_weights()
        self._init_weights()
        # EOS ids generate() stops on by default: generation_config.json's when loaded from a folder.
        self.generation_config, self.generation_eos_ids = {}, _eos_list(config.eos_token_id)

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
        """Logits (B, T, V), or (B, n, V) of the last n positions with logits_to_keep=n; hidden_states:
        the final-norm states (B, T, D) instead (VCP's text supervisor, Tab. 7). attention_mask (B,
        cache.length + T): 1 = token; positions count tokens only, so left padding changes nothing."""
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
        mask = _mask_or_none(attention_mask, T, past, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]  # (B, n, D)
        x = self.model.norm(x)
        if hidden_states:
            return x  # (B, T or n, D)
        few_cpu_rows = x.device.type == "cpu" and x.shape[:2].numel() <= 32 and not torch.is_grad_enabled()
        if few_cpu_rows and type(self.lm_head) is nn.Linear:  # decoding on CPU
            return _cpu_decoding_logits(self.lm_head.weight, x)
        return self.lm_head(x)  # (B, T or n, V)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu") -> "LLM":
        """A Hugging Face folder; built on the meta device, filled one tensor at a time (hf.load_weights)."""
        folder = hf.checkpoint_folder(folder)  # a CPT save cut by a kill: its last whole checkpoint
        config = LLMConfig.from_hf(*hf.read_config(folder, "an LLM folder holds config.json and safetensors weights"))
        with torch.device("meta"):
            llm = cls(config)
        hf.load_weights(llm, folder, dtype, device, ignore={"lm_head.weight"} if config.tie_word_embeddings else ())
        llm.tie_weights()
        llm.generation_config = hf.read_generation_config(folder)
        if llm.generation_config.get("eos_token_id") is not None:
            llm.generation_eos_ids = _eos_list(llm.generation_config["eos_token_id"])
        return llm.eval()

    def save_pretrained(self, folder: str, max_shard_size: int = 2**30, tokenizer=None, dtype=None):
        """A folder transformers' AutoModelForCausalLM.from_pretrained loads, LoRA folded in. `dtype`:
        the weights' dtype on disk (default: as in memory; training keeps fp32 master weights)."""
        hf.save_llm(folder, merged_parameters(self), self.config.to_hf(), self.generation_config,
                    self.generation_eos_ids, max_shard_size, dtype, tokenizer)

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 32,
                 eos_token_id=None, num_beams: int = 1, length_penalty: float = 1.0, pad_token_id=None):
        """New tokens (B, <= max_new_tokens) of left-padded prompts, padded with pad_token_id (default: the
        first EOS id) after EOS (int or list, default generation_config.json's). num_beams > 1: as
        transformers' generate(num_beams=k, do_sample=False, length_penalty=..., early_stopping=False)."""
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
        eos = torch.tensor(eos, dtype=torch.long, device=embeds.device)
        if num_beams != 1:
            return self._beam_search(logits, cache, full_mask, T, max_new_tokens, eos, pad, num_beams, length_penalty)
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=logits.device)  # greedy
        done = torch.zeros(B, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            token = torch.where(done, pad, logits.argmax(-1))  # (B,)
            out[:, step] = token
            done |= torch.isin(token, eos)
            if step + 1 == max_new_tokens or bool(done.all()):
                return out[:, :step + 1]
            logits = self(token[:, None], attention_mask=full_mask[:, :T + step + 1], cache=cache)[:, -1].float()

    def _beam_search(self, logits, cache, full_mask, T, max_new_tokens, eos, pad, K, length_penalty):
        """transformers' beam search (generation/utils.py `_beam_search`, 5.x) on tensors. Each step keeps
        the top (1 + #eos, at least 2) * K continuations; those ending in EOS (or at max length) among the
        top K become finished hypotheses scored logprob / new_length ** length_penalty, the best K others
        run on. A prompt stops once its K finished ones beat what its best running beam can still reach."""
        B, V = logits.shape
        L, dev = max_new_tokens, logits.device
        keep = max(2, 1 + len(eos)) * K
        top_k_mask = torch.arange(keep, device=dev) < K                      # (keep,)
        log_probs = F.log_softmax(logits, dim=-1).repeat_interleave(K, 0)    # (B*K, V)
        cache.k, cache.v = cache.k.repeat_interleave(K, dim=1), cache.v.repeat_interleave(K, dim=1)  # per beam
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
            alive_scores = top_scores + hits.to(torch.float32) * -1.0e9     # the best K not stopped run on
            nxt = torch.topk(alive_scores, K).indices                        # (B, K)
            running = candidates.gather(1, nxt[:, :, None].expand(B, K, L))
            running_scores = alive_scores.gather(1, nxt)
            parent_rows = (parent.gather(1, nxt) + batch_offset).view(-1)   # (B*K,)
            just = hits & top_k_mask[None, :]  # stopped among the top K: they compete with the finished ones
            new_scores = top_scores / ((step + 1) ** length_penalty) + (~open_).to(torch.float32) * -1.0e9
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
            n = cache.length  # each beam goes on from its parent's keys and values
            cache.k[:, :, :, :n], cache.v[:, :, :, :n] = cache.k[:, parent_rows, :, :n], cache.v[:, parent_rows, :, :n]
            token = running[:, :, step].reshape(B * K, 1)
            logits = self(token, attention_mask=full_mask[:, :T + step + 1], cache=cache)[:, -1].float()
            log_probs = F.log_softmax(logits, dim=-1)                        # (B*K, V)
        return finished[:, 0, :int(finished_len[:, 0].max())]


# ----------------------------------------------------------------------------- LoRA
# LoRA (Hu et al.), as the paper uses for the DINOv2 backbone (r=8, alpha=16) and for the
# LLM during the optional full-tuning pass of section 3.3.

class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update: y = x W^T + b + dropout(x) A^T B^T * alpha / r. `weight`
    and `bias` keep the wrapped layer's names (a base checkpoint still loads), `lora_A` / `lora_B`
    are PEFT's. The adapters are fp32 whatever the base's dtype: they are what trains, and an
    update of lr 1e-5 to a bf16 weight mostly rounds away."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A random, B zero: the wrapped layer starts out unchanged (LoRA paper, section 4.1).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scale
        return out + update.to(out.dtype)  # under autocast both run in the autocast dtype anyway

    def merged_weight(self):  # W + B A * alpha / r, in W's dtype
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


def apply_lora(module: nn.Module, targets=("q_proj", "v_proj"), r: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> list:
    """Wrap every nn.Linear named in `targets` (base weights untouched, not frozen); the wrapped names."""
    wrapped = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise UserError(f"apply_lora: no nn.Linear named any of {list(targets)} in {type(module).__name__}")
    return wrapped


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the plain nn.Linear it equals (for fast inference); returns the module."""
    for parent in list(module.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, LoRALinear):
                lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, m.weight.device, m.weight.dtype)
                lin.weight.copy_(m.merged_weight()).requires_grad_(m.weight.requires_grad)
                if m.bias is not None:
                    lin.bias.copy_(m.bias).requires_grad_(m.bias.requires_grad)
                setattr(parent, name, lin)
    return module


@torch.no_grad()
def merged_parameters(module: nn.Module) -> dict:
    """{name: tensor} of the parameters with every LoRALinear folded into its weight, adapters left
    out; the module is unchanged, so a training run can save a plain checkpoint and go on."""
    lora = {f"{n}.weight": m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    return {name: lora[name].merged_weight() if name in lora else p.detach().contiguous()
            for name, p in module.named_parameters() if ".lora_A." not in name and ".lora_B." not in name}


def lora_parameters(module: nn.Module) -> dict:
    """{name: parameter} of the adapter matrices only."""
    return {n: p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def save_lora(module: nn.Module, folder: str):
    """The adapters on their own, as PEFT saves them (adapter_model.safetensors + adapter_config.json)."""
    layers = {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}
    hf.write_lora(folder, layers, lora_parameters(module))


def load_lora(module: nn.Module, folder: str) -> nn.Module:
    """Apply adapters saved by `save_lora` (wrapping the target layers first if needed)."""
    config, tensors, path = hf.read_lora(folder)
    if not any(isinstance(m, LoRALinear) for m in module.modules()):
        apply_lora(module, config["target_modules"], config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    copy_strict(lora_parameters(module), tensors, path)
    return module


# ----------------------------------------------------------------------------- Connector
# Section 3.3: "We choose a two-layer MLP as the connector as LLaVA-1.5 proposed", applied
# to the word-level visual tokens; the linear variant is the Tab. 8 row-2 ablation.

class Connector(nn.Module):
    def __init__(self, visual_dim: int, llm_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise UserError(f"connector kind must be 'mlp' or 'linear', got {kind!r}")
        self.kind = kind
        self.proj = (nn.Sequential(nn.Linear(visual_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
                     if kind == "mlp" else nn.Linear(visual_dim, llm_dim))

    def forward(self, word_features):  # (B, N, D_visual) -> (B, N, D_llm)
        return self.proj(word_features)


# ----------------------------------------------------------------------------- LLaVASLT
# Section 3.3 / Fig. 2 right: the connector output is inserted into the user turn of the
# chat template, "concatenating them with text token embeddings as the overall input".

class PrefixCache:
    """Keys and values of the prompt prefix every row starts with (VLT's system turn), computed once
    for a frozen LLM instead of every step. Read-only, so one object serves every step: update()
    concatenates (autograd must not see a buffer that later layers overwrite)."""

    def __init__(self, llm: LLM, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=llm.lm_head.weight.device)  # (P,)
        cache = KVCache(llm.config, 1, len(ids), device=ids.device, dtype=llm.lm_head.weight.dtype)
        with torch.no_grad():
            llm(ids[None], cache=cache)
        self.ids, self.k, self.v, self.length = ids, cache.k, cache.v, len(ids)  # k, v (L, 1, KV, P, hd)
        self.batch_size = None  # any: the one prefix row serves every row of a batch

    def update(self, layer: int, k, v):
        """This call's k/v (B, KV, T, hd) after the prefix's: (B, KV, P + T, hd)."""
        # .to: under autocast the new keys are bf16 while the prefix was stored in the weights' dtype
        return (torch.cat([self.k[layer].to(k.dtype).expand(len(k), -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].to(v.dtype).expand(len(v), -1, -1, -1), v], dim=2))

    def advance(self, n: int):
        pass  # every call continues from the prefix alone


class LLaVASLT(nn.Module):
    """Connector + LLM (+ the visual encoder, passed in: model.py does not import vision.py).
    Prompts hold `slot_mask` positions whose embeddings are replaced by the projected visual
    tokens, one slot per valid word feature (Tab. 8's sentence-level ablation: per position)."""

    def __init__(self, llm: LLM, connector: Connector, visual_encoder: nn.Module = None, visual_tokens: str = "word"):
        super().__init__()
        if visual_tokens not in ("word", "sentence"):
            raise UserError(f"visual_tokens must be 'word' or 'sentence', got {visual_tokens!r}")
        self.llm, self.connector, self.visual_encoder = llm, connector, visual_encoder
        self.visual_tokens = visual_tokens

    def visual_features(self, frames, frame_mask):
        """frames (B, T, 3, H, W) -> visual tokens (B, N, D_visual) and their mask (B, N)."""
        out = self.visual_encoder.encode_video(frames, frame_mask)
        if self.visual_tokens == "sentence":  # Tab. 8 row 1: the full-attention encoder's penultimate layer
            return out["sentence_features"], out["word_mask"]  # (B, N, D): a whole-clip receptive field each
        return out["word_features"], out["word_mask"]

    def splice(self, input_ids, slot_mask, word_features, word_mask):
        """Embeddings (B, T, D) of input_ids (B, T) with word_features (B, N, D_visual) written into the
        slots in reading order: row b must have exactly word_mask[b].sum() slots (slot_mask (B, T))."""
        embeds = self.llm.embed(input_ids)  # (B, T, D)
        visual = self.connector(word_features).to(embeds.dtype)  # (B, N, D)
        n_slots, n_valid = slot_mask.sum(1), word_mask.sum(1)
        if not torch.equal(n_slots, n_valid):
            raise ValueError(f"prompt slots {n_slots.tolist()} do not match valid visual tokens {n_valid.tolist()}")
        return embeds.masked_scatter(slot_mask.unsqueeze(-1), visual[word_mask])

    def forward(self, input_ids, attention_mask, slot_mask, word_features=None, word_mask=None,
                frames=None, frame_mask=None, prefix: PrefixCache = None):
        """Logits (B, T, V) from cached visual tokens, or from frames through the visual encoder.
        With `prefix` (a PrefixCache of the first P tokens of every row) only the rest is computed:
        the logits of positions P.. (B, T - P, V)."""
        if frames is not None:
            word_features, word_mask = self.visual_features(frames, frame_mask)
        if prefix is not None:
            P = prefix.length
            if not (torch.equal(input_ids[:, :P], prefix.ids.expand(len(input_ids), P))
                    and bool(attention_mask[:, :P].all()) and not bool(slot_mask[:, :P].any())):
                raise ValueError("LLaVASLT.forward: every row must start with the prefix's tokens "
                                 "(right-padded prompts with the same system turn)")
            if any(p.requires_grad for p in self.llm.parameters()):
                raise ValueError("LLaVASLT.forward: a PrefixCache needs a frozen LLM (its keys would go stale)")
            input_ids, slot_mask = input_ids[:, P:], slot_mask[:, P:]  # (B, T - P)
        embeds = self.splice(input_ids, slot_mask, word_features, word_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, cache=prefix)  # (B, T or T - P, V)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, slot_mask, word_features, word_mask, **kwargs):
        """Left-padded prompts ending with the assistant header -> new token ids (B, <=max_new_tokens)."""
        embeds = self.splice(input_ids, slot_mask, word_features, word_mask)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def connector_dims(self):
        first = self.connector.proj[0] if self.connector.kind == "mlp" else self.connector.proj
        return first.in_features, self.llm.config.hidden_size

    def save(self, folder: str, llm_folder: str, visual_folder: str, settings: dict, save_visual=None):
        """A LLaVA-SLT folder (hf.save_llava); save_visual(folder) writes a tuned visual encoder."""
        hf.save_llava(self, folder, llm_folder, visual_folder, settings, lambda f: save_lora(self.llm, f), save_visual)

    @staticmethod
    def read_config(folder: str, check_visual: bool = True) -> dict:
        """config.json with the LLM and visual folders resolved (hf.read_llava_config)."""
        return hf.read_llava_config(folder, check_visual)

    @classmethod
    def load(cls, folder: str, load_visual, dtype=torch.float32, device="cpu") -> "LLaVASLT":
        """load_visual(folder) -> the visual encoder (vision.VCPModel.load); model.py does not import vision.py."""
        config = cls.read_config(folder)
        llm = LLM.from_pretrained(config["llm"], dtype=dtype, device=device)
        if adapter := hf.llava_adapter(config["folder"]):  # LoRA on the LLM, after full-tuning
            load_lora(llm, adapter)
        connector = Connector(config["visual_dim"], llm.config.hidden_size, config["connector"])
        hf.load_connector(connector, config["folder"])
        connector = connector.to(device=device, dtype=dtype)
        model = cls(llm, connector, load_visual(config["visual"]), config["visual_tokens"])
        model.config = config
        return model.eval()
