"""The training losses of LLaVA-SLT (paper Eq. 1 and Eq. 2, sections 3.1-3.3).

- `clip_loss`: the outer contrastive loss of visual contrastive pretraining (section 3.2,
  L_CLIP in Eq. 2), CLIP's symmetric cross-entropy; under torch.distributed it is computed
  over the global batch, gathering the other ranks' embeddings.
- `signcl_loss`: the inner contrastive loss L_SignCL of Eq. 2 (Ye et al. 2024, "Improving
  gloss-free sign language translation by reducing representation density"), on the
  word-level features of the hierarchical encoder. Their released pre-training script
  computes it and never back-propagates it; here it is a real, differentiable term.
- `lm_loss`: the next-token cross-entropy of Eq. 1, used for continued pretraining (3.1)
  and, with IGNORE_INDEX on everything but the answer, for visual language tuning (3.3).

Imports nothing of ours: a fork can copy it alone.
"""

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

IGNORE_INDEX = -100  # LLaVA's convention: labels that take no loss (data.py builds them)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16 (autocast outputs) to fp32; leave fp32/fp64 alone."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _full_precision(x: torch.Tensor):
    """Autocast off for a loss's own arithmetic: under the training loop's bf16 autocast a
    matmul of fp32 inputs would still run in bf16 (CLIP's similarity matrix at scale 100
    then loses about 1e-3 of the loss)."""
    return torch.autocast(x.device.type, enabled=False)


# ----------------------------------------------------------------------------- CLIP

class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W*b, D)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)  # every rank's loss sends its gradient of these rows back
        b = grad.shape[0] // torch_dist.get_world_size()
        return grad[torch_dist.get_rank() * b:(torch_dist.get_rank() + 1) * b]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """`x` (b, D) of every rank, in rank order -> (W*b, D), with gradients: each rank's rows get
    the sum of every rank's gradient for them. So when every rank computes the same global
    loss from the gathered rows, DDP's average of the parameter gradients is that loss's
    gradient: the loss needs no factor of the world size."""
    return _AllGather.apply(x)


def _check_equal_batches(b: int, device: torch.device) -> None:
    world = torch_dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    torch_dist.all_gather(sizes, torch.tensor([b], dtype=torch.long, device=device))
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"clip_loss: ranks have different batch sizes {sizes}; all_gather needs "
                         f"equal ones (use drop_last=True in the DataLoader/DistributedSampler)")


def clip_loss(video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP's symmetric contrastive loss between videos and their sentences.

    video_emb, text_emb: (B, D), unnormalised (L2-normalised here); row i of each is a pair.
    logit_scale: the multiplier (a float or a scalar tensor, e.g. exp(log_scale) clamped to
    100 by the caller), not its log.
    Returns the mean of the video->text and text->video cross-entropies (at least fp32).

    Under torch.distributed (initialised, world size W > 1) every rank gathers the other
    ranks' embeddings (`all_gather`) and computes the loss over the global batch, the full
    (W*B) x (W*B) logit matrix: the value equals the single-process loss over the W*B pairs,
    the same on all ranks, and DDP's average of the parameter gradients is its gradient
    (the logit scale's too). Every rank must pass the same B (use drop_last=True);
    otherwise a ValueError is raised.
    """
    if video_emb.dim() != 2 or video_emb.shape != text_emb.shape:
        raise ValueError(f"clip_loss: video_emb {tuple(video_emb.shape)} and text_emb "
                         f"{tuple(text_emb.shape)} must both be (B, D) with the same B and D")
    # fp32, autocast off: under autocast the embeddings may be bf16, and the softmax over a
    # large global batch at scale 100 is where the precision matters
    with _full_precision(video_emb):
        v = F.normalize(_at_least_fp32(video_emb), dim=-1)  # (B, D)
        t = F.normalize(_at_least_fp32(text_emb), dim=-1)  # (B, D)
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            _check_equal_batches(v.shape[0], v.device)
            v, t = all_gather(v), all_gather(t)  # (W*B, D) each
        if torch.is_tensor(logit_scale):
            logit_scale = _at_least_fp32(logit_scale)
        return symmetric_cross_entropy(logit_scale * v @ t.T)  # (N, N) video i vs text j


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's loss on a similarity matrix (N, N) whose diagonal holds the pairs: the mean of the
    row-wise (video -> text) and column-wise (text -> video) cross-entropies."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ----------------------------------------------------------------------------- SignCL

def signcl_margin(lengths: torch.Tensor, text_lengths=None, num_negatives: int = 4,
                  min_margin: int = 2, zipf_factor: float = 2.3) -> torch.Tensor:
    """Per-clip negative margin of `signcl_loss` (see its docstring); (B,) long.

    SignCL's training scripts use, at frame level and per batch,
    max(10, int((n_frames // n_text + 1) * 2.3)) * 2, capped at (n_frames - 30) / 2; here
    the same idea per clip on word features, with the floor applied last so it can never
    go below min_margin (their cap could make it negative on short batches).
    """
    margin = torch.full_like(lengths, min_margin)
    if text_lengths is None:
        return margin
    m = (zipf_factor * (lengths // text_lengths.clamp_min(1) + 1).float()).long()
    m = torch.minimum(m, (lengths - 1 - num_negatives) // 2)
    return torch.maximum(m, margin)


def signcl_loss(word_features: torch.Tensor, mask: torch.Tensor, text_lengths=None, *,
                num_negatives: int = 4, max_distance: float = 32.0, min_margin: int = 2,
                zipf_factor: float = 2.3, p: int = 1,
                generator: "torch.Generator | int | None" = None) -> torch.Tensor:
    """SignCL's inner contrastive loss over each clip's word-feature sequence.

    word_features: (B, T, D); mask: (B, T) bool, True = valid (padding is never sampled as
    anchor, positive or negative, and gets exactly zero gradient).
    text_lengths: (B,) number of text tokens per clip, or None; it sets the margin.

    For every valid position i (the anchor) of a clip with L valid positions:
      positives: its valid neighbours i-1 and i+1 (SignCL's pos_samples=2, distance 1);
      negatives: `num_negatives` positions drawn uniformly without replacement from the
        valid positions j with |j - i| > margin;
      d = ||x_i - x_j||_p (p=1 as SignCL's code, or 2);
      loss_i = mean_pos softplus(d - max_distance) + mean_neg softplus(max_distance - d).
    Returns the mean of loss_i over the anchors of the batch that have at least one
    positive and one negative; 0 (still attached to the graph) when none has.

    margin per clip (SignCL's, moved from frames to word features and made per clip):
      margin = int(zipf_factor * (L // text_len + 1))   # positions per text token, x Zipf factor
      margin = min(margin, (L - 1 - num_negatives) // 2) # a middle anchor keeps num_negatives candidates
      margin = max(margin, min_margin)                   # never closer than min_margin (>= 1)
    Without text_lengths, margin = min_margin.

    generator: a torch.Generator, or an int seed, for the negative sampling; the loss is
    then deterministic. None uses the global RNG.
    """
    if word_features.dim() != 3 or mask.shape != word_features.shape[:2]:
        raise ValueError(f"signcl_loss: word_features {tuple(word_features.shape)} must be (B, T, D) "
                         f"and mask {tuple(mask.shape)} (B, T)")
    if min_margin < 1:
        raise ValueError(f"signcl_loss: min_margin={min_margin} must be >= 1, else neighbours are negatives")
    if num_negatives < 1:
        raise ValueError(f"signcl_loss: num_negatives={num_negatives} must be >= 1")
    if p not in (1, 2):
        raise ValueError(f"signcl_loss: p={p}; use 1 (L1, as SignCL) or 2 (L2)")
    with _full_precision(word_features):
        return _signcl(word_features, mask, text_lengths, num_negatives, max_distance, min_margin, zipf_factor, p,
                       generator)


def _signcl(word_features, mask, text_lengths, num_negatives, max_distance, min_margin, zipf_factor, p, generator):
    B, T, _ = word_features.shape
    device = word_features.device
    mask = mask.to(device=device, dtype=torch.bool)
    # zero the padding first: its gradient is then exactly zero whatever it holds
    x = _at_least_fp32(word_features).masked_fill(~mask[..., None], 0.0)  # (B, T, D)

    lengths = mask.sum(1)  # (B,)
    if text_lengths is not None:
        text_lengths = torch.as_tensor(text_lengths, dtype=torch.long, device=device).reshape(-1)
        if text_lengths.shape[0] != B:
            raise ValueError(f"signcl_loss: {text_lengths.shape[0]} text_lengths for a batch of {B}")
    margin = signcl_margin(lengths, text_lengths, num_negatives, min_margin, zipf_factor)  # (B,)

    pos = torch.arange(T, device=device)
    gap = (pos[None, :] - pos[:, None]).abs()  # (T, T) |j - i|
    pair_ok = mask[:, :, None] & mask[:, None, :]  # (B, T, T) anchor i and sample j both valid
    is_neg_candidate = pair_ok & (gap[None] > margin[:, None, None])  # (B, T, T)

    # uniform sampling without replacement: random keys on the candidates, take the top k
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    rng_device = generator.device if generator is not None else device
    keys = torch.rand(B, T, T, generator=generator, device=rng_device).to(device)  # (B, T, T) in [0, 1)
    keys = keys.masked_fill(~is_neg_candidate, -1.0)
    k = min(num_negatives, T)
    top_keys, neg_idx = keys.topk(k, dim=-1)  # (B, T, k)
    neg_ok = top_keys >= 0  # (B, T, k) a real candidate was drawn

    # positives: the neighbours i-1 and i+1 where they exist and are valid
    prev, nxt = (pos - 1).clamp(min=0), (pos + 1).clamp(max=T - 1)
    pos_idx = torch.stack([prev, nxt], -1).expand(B, T, 2)  # (B, T, 2)
    pos_ok = torch.stack([mask[:, prev] & (pos >= 1), mask[:, nxt] & (pos <= T - 2)], -1)
    pos_ok = pos_ok & mask[..., None]  # (B, T, 2)

    # distances to the drawn samples only (not all T x T pairs: T x T x D would not fit)
    idx = torch.cat([pos_idx, neg_idx], -1)  # (B, T, 2+k)
    samples = x[torch.arange(B, device=device)[:, None, None], idx]  # (B, T, 2+k, D)
    d = _distance(x[:, :, None, :], samples, p)  # (B, T, 2+k)
    pos_d, neg_d = d[..., :2], d[..., 2:]  # (B, T, 2), (B, T, k)

    n_pos, n_neg = pos_ok.sum(-1), neg_ok.sum(-1)  # (B, T)
    pos_loss = torch.where(pos_ok, F.softplus(pos_d - max_distance), 0.0).sum(-1) / n_pos.clamp_min(1)
    neg_loss = torch.where(neg_ok, F.softplus(max_distance - neg_d), 0.0).sum(-1) / n_neg.clamp_min(1)

    anchor_ok = mask & (n_pos > 0) & (n_neg > 0)  # (B, T)
    total = torch.where(anchor_ok, pos_loss + neg_loss, 0.0).sum()
    return total / anchor_ok.sum().clamp_min(1)  # 0 with a graph when no anchor qualifies


def _distance(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """L1 or L2 distance over the last dim, with a finite gradient at zero distance."""
    diff = a - b
    if p == 1:
        return diff.abs().sum(-1)
    # sqrt has an infinite derivative at 0 (the unused slots point at the anchor): clamp inside
    return diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()


# ----------------------------------------------------------------------------- LM

def lm_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Next-token cross-entropy (Eq. 1) over the supervised tokens of a batch.

    logits: (B, T, V); labels: (B, T) aligned with input_ids (shifted here: logits at t
    predict labels at t+1), IGNORE_INDEX (-100) where no loss is taken.
    Returns (mean over the batch's supervised tokens, their number as a long tensor), so a
    training loop can weight micro-batches by tokens over an accumulation window
    (sum of loss * n / sum of n). No supervised token -> loss 0 (attached to the graph).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} must be (B, T, V) and labels "
                         f"{tuple(labels.shape)} (B, T)")
    with _full_precision(logits):
        shift_logits = _at_least_fp32(logits[:, :-1])  # (B, T-1, V) fp32: the log-softmax over a big vocabulary
        shift_labels = labels[:, 1:].to(logits.device)  # (B, T-1)
        n_tokens = (shift_labels != IGNORE_INDEX).sum()
        total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / n_tokens.clamp_min(1), n_tokens
