"""Tests for losses.py: CLIP (single process and 2-process gloo), SignCL, LM loss."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import IGNORE_INDEX, clip_loss, lm_loss, signcl_loss, signcl_margin


# ============================================================================ CLIP

def _clip_by_hand(v, t, scale):
    """Symmetric CLIP cross-entropy with explicit loops over python floats."""
    n = len(v)
    vn = [[a / math.sqrt(sum(c * c for c in row)) for a in row] for row in v]
    tn = [[a / math.sqrt(sum(c * c for c in row)) for a in row] for row in t]
    logit = [[scale * sum(a * b for a, b in zip(vn[i], tn[j])) for j in range(n)] for i in range(n)]
    v2t = sum(-logit[i][i] + math.log(sum(math.exp(logit[i][j]) for j in range(n))) for i in range(n)) / n
    t2v = sum(-logit[j][j] + math.log(sum(math.exp(logit[i][j]) for i in range(n))) for j in range(n)) / n
    return (v2t + t2v) / 2


def test_clip_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3  # unnormalised on purpose
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for scale in (1.0, 1 / 0.07, torch.tensor(100.0)):
        expected = _clip_by_hand(v.tolist(), t.tolist(), float(scale))
        got = clip_loss(v, t, scale)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-12)
    # autocast outputs (bf16) are scored in fp32
    assert clip_loss(v.bfloat16(), t.bfloat16(), 10.0).dtype == torch.float32


def test_clip_loss_perfect_alignment_and_symmetry():
    # identical, orthogonal pairs at a large scale: both directions are ~certain -> loss ~0
    e = torch.eye(4) * 5
    assert clip_loss(e, e, 100.0).item() == pytest.approx(0.0, abs=1e-6)
    # swapping the modalities swaps the two directions, which the mean does not see
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    torch.testing.assert_close(clip_loss(v, t, 10.0), clip_loss(t, v, 10.0))


def test_clip_loss_shape_errors():
    with pytest.raises(ValueError, match="same B and D"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)


class _ScaledLinear(torch.nn.Module):
    def __init__(self, weight, scale):
        super().__init__()
        self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(weight)
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x), self.scale


def _ddp_worker(rank, world, init_file, data, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, t_all, weight, scale = data["x"], data["t"], data["weight"], data["scale"]
        b = x.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        # video side through a DDP-wrapped linear layer with a learnable logit scale, text side a leaf tensor
        lin = _ScaledLinear(weight, scale)
        model = torch.nn.parallel.DistributedDataParallel(lin)
        v, s = model(x[sl])
        t = t_all[sl].clone().requires_grad_(True)
        loss = clip_loss(v, t, s)
        gv, gt = torch.autograd.grad(loss, [v, t], retain_graph=True)
        loss.backward()  # every rank's loss is the global one: DDP's average is its gradient
        result = {"loss": loss.detach(), "gv": gv, "gt": gt, "gw": lin.lin.weight.grad.clone(),
                  "gs": lin.scale.grad.clone()}
        # unequal batches must fail loudly on every rank, not hang or mis-pair
        try:
            clip_loss(v[: b - rank], t[: b - rank], scale)
        except ValueError as e:
            result["error"] = str(e)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_clip_loss_two_process_gloo_equals_single_process(tmp_path):
    world, b = 2, 3
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(world * b, 5, generator=g, dtype=torch.float64),
            "t": torch.randn(world * b, 4, generator=g, dtype=torch.float64),
            "weight": torch.randn(4, 5, generator=g, dtype=torch.float64),
            "scale": 1 / 0.07}
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "store"), data, str(tmp_path)), nprocs=world, join=True)

    # the same computation in one process over the global batch of world * b
    w = data["weight"].clone().requires_grad_(True)
    v = data["x"] @ w.T
    t = data["t"].clone().requires_grad_(True)
    scale = torch.tensor(data["scale"], dtype=torch.float64, requires_grad=True)
    loss = clip_loss(v, t, scale)
    gv, gt = torch.autograd.grad(loss, [v, t], retain_graph=True)
    gw, gs = torch.autograd.grad(loss, [w, scale])

    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        sl = slice(rank * b, (rank + 1) * b)
        torch.testing.assert_close(r["loss"], loss.detach(), atol=1e-6, rtol=0)
        # this rank's rows get every rank's gradient for them: W identical losses
        torch.testing.assert_close(r["gv"], world * gv[sl], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["gt"], world * gt[sl], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["gw"], gw, atol=1e-6, rtol=0)  # DDP's average: the global gradient
        torch.testing.assert_close(r["gs"], gs, atol=1e-6, rtol=0)  # the scale too, with no correction
        assert "different batch sizes [3, 2]" in r["error"]


# ============================================================================ SignCL

def _l1(a, b):
    return sum(abs(p - q) for p, q in zip(a, b))


def _l2(a, b):
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))


def _signcl_by_hand(x, n_valid, margin, max_distance, dist=_l1):
    """SignCL with every negative candidate taken (valid when there are <= num_negatives)."""
    def softplus(z):
        return math.log1p(math.exp(z))

    total, anchors = 0.0, 0
    for i in range(n_valid):
        pos = [j for j in (i - 1, i + 1) if 0 <= j < n_valid]
        neg = [j for j in range(n_valid) if abs(j - i) > margin]
        if not pos or not neg:
            continue
        total += sum(softplus(dist(x[i], x[j]) - max_distance) for j in pos) / len(pos)
        total += sum(softplus(max_distance - dist(x[i], x[j])) for j in neg) / len(neg)
        anchors += 1
    return total / anchors


def test_signcl_matches_hand_computation():
    # one clip of 5 valid positions + 2 padding, margin 2 (no text lengths):
    #   anchor 0: positives {1}, negatives {3, 4};  anchor 1: {0, 2}, {4}
    #   anchor 2: {1, 3}, none -> skipped;          anchor 3: {2, 4}, {0};  anchor 4: {3}, {0, 1}
    # at most 2 candidates each, so with num_negatives=4 every candidate is taken: no randomness
    feats = [[0.0, 0.0], [1.0, 0.5], [2.0, -1.0], [4.0, 1.0], [3.0, 3.0]]
    x = torch.tensor([feats + [[9.0, 9.0], [-9.0, 9.0]]])  # (1, 7, 2)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    got = signcl_loss(x, mask, num_negatives=4, max_distance=3.0, min_margin=2, generator=0)
    assert got.item() == pytest.approx(_signcl_by_hand(feats, 5, 2, 3.0), rel=1e-6)
    # e.g. anchor 0: positive 1 at L1 1.5, negatives 3, 4 at L1 5 and 6:
    #   softplus(1.5 - 3) + (softplus(3 - 5) + softplus(3 - 6)) / 2
    # L2 distances (anchor 0 vs 1: sqrt(1 + 0.25)) through the same loop
    got2 = signcl_loss(x, mask, num_negatives=4, max_distance=3.0, min_margin=2, p=2, generator=0)
    assert got2.item() == pytest.approx(_signcl_by_hand(feats, 5, 2, 3.0, _l2), rel=1e-6)


def test_signcl_margin_formula():
    lengths = torch.tensor([40, 12, 5, 30])
    text = torch.tensor([10, 2, 1, 100])
    # 40 // 10 + 1 = 5 -> int(2.3 * 5) = 11, cap (40 - 1 - 4) // 2 = 17 -> 11
    # 12 // 2 + 1 = 7 -> 16, cap (12 - 5) // 2 = 3 -> 3
    # 5 // 1 + 1 = 6 -> 13, cap 0 -> floor 2
    # 30 // 100 + 1 = 1 -> int(2.3) = 2 -> 2
    assert signcl_margin(lengths, text).tolist() == [11, 3, 2, 2]
    assert signcl_margin(lengths, None, min_margin=3).tolist() == [3, 3, 3, 3]


def test_signcl_gradients_real_on_valid_zero_on_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=g)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = False
    mask[2, 12:] = False
    x[~mask] = float("nan")  # padding may hold anything; it must never be read
    x.requires_grad_(True)
    loss = signcl_loss(x, mask, text_lengths=[3, 2, 4], max_distance=8.0, generator=0)
    assert torch.isfinite(loss)
    loss.backward()
    assert (x.grad[~mask] == 0).all()
    assert (x.grad[mask].abs().sum(-1) > 0).all()  # every valid position is an anchor or a sample
    # and the value does not depend on what the padding holds
    x2 = x.detach().clone()
    x2[~mask] = 1e6
    torch.testing.assert_close(signcl_loss(x2, mask, text_lengths=[3, 2, 4], max_distance=8.0, generator=0),
                               loss.detach())


def test_signcl_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 30, 6, generator=g)
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[0, 20:] = False
    a = signcl_loss(x, mask, max_distance=6.0, generator=torch.Generator().manual_seed(7))
    b = signcl_loss(x, mask, max_distance=6.0, generator=7)
    c = signcl_loss(x, mask, max_distance=6.0, generator=8)
    assert a.item() == b.item()
    assert a.item() != c.item()  # 26 candidates for 4 draws: another seed draws others


def test_signcl_short_sequences_no_nan():
    x = torch.randn(4, 6, 3, requires_grad=True)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, :1] = True  # one position: no positive
    mask[2, :2] = True  # two: no negative farther than margin 2
    mask[3, :3] = True  # three: still none (|2 - 0| = 2 is not > 2)
    loss = signcl_loss(x, mask, text_lengths=[1, 1, 1, 1], generator=0)
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    # one long enough clip in the batch: only its anchors count, still finite
    mask[0, :] = True
    loss = signcl_loss(x, mask, generator=0)
    assert torch.isfinite(loss) and loss.item() > 0


# ============================================================================ LM loss

def test_lm_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX  # the prompt
    labels[1, 5] = IGNORE_INDEX
    loss, n = lm_loss(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    assert n.dtype == torch.long and n.item() == 3 + 4  # row 0: labels 3..5; row 1: labels 1..4
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g1, g2)
    # the first label is never predicted (nothing precedes it)
    labels2 = labels.clone()
    labels2[:, 0] = 7
    assert lm_loss(logits, labels2)[0].item() == loss.item()


def test_lm_loss_token_weighted_accumulation():
    # sum(loss_i * n_i) / sum(n_i) over micro-batches == the loss of the whole batch
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 7, generator=g)
    labels = torch.randint(0, 7, (4, 5), generator=g)
    labels[0, 1:] = IGNORE_INDEX
    labels[3, :2] = IGNORE_INDEX
    (l1, n1), (l2, n2) = lm_loss(logits[:2], labels[:2]), lm_loss(logits[2:], labels[2:])
    whole, n = lm_loss(logits, labels)
    torch.testing.assert_close((l1 * n1 + l2 * n2) / (n1 + n2), whole)
    assert (n1 + n2).item() == n.item() == 0 + 4 + 4 + 3


def test_lm_loss_no_supervised_tokens_is_zero_not_nan():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    loss, n = lm_loss(logits, labels)
    assert loss.item() == 0.0 and n.item() == 0
    loss.backward()
    assert (logits.grad == 0).all()


def test_lm_loss_shape_error():
    with pytest.raises(ValueError, match="lm_loss"):
        lm_loss(torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))


# ============================================================================ precision under autocast

def _loss_and_grads(fn, *inputs, autocast=False):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(*inputs)
    loss.backward()
    return loss.detach(), [x.grad for x in inputs]


def test_losses_are_computed_in_fp32_under_bf16_autocast():
    """The training loop runs the step under bf16 autocast; each loss switches it off for its
    own arithmetic, so it equals the fp32 loss (value and gradient) on the same inputs."""
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    scale = torch.tensor(100.0)
    cases = {
        "clip": (lambda a, b, s: clip_loss(a, b, s), (v, t, scale)),
        "signcl": (lambda w: signcl_loss(w, torch.ones(4, 24, dtype=torch.bool), generator=0, max_distance=8.0),
                   (torch.randn(4, 24, 32, generator=g),)),
        "lm": (lambda lg: lm_loss(lg, torch.randint(0, 500, (4, 16), generator=g))[0],
               (torch.randn(4, 16, 500, generator=g) * 4,)),
    }
    for name, (fn, inputs) in cases.items():
        state = g.get_state()
        ref, ref_grads = _loss_and_grads(fn, *inputs)
        g.set_state(state)
        got, grads = _loss_and_grads(fn, *inputs, autocast=True)
        assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 1e-5, (name, got, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    # what autocast alone would give (the similarity matmul in bf16): off by far more than 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = 100.0 * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    target = torch.arange(64)
    bf16 = (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.float().T, target)) / 2
    assert abs(bf16.item() - clip_loss(v, t, 100.0).item()) > 1e-4
