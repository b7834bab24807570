"""Speed and memory figures of llava-slt, as ratios against `transformers` where it has the same model.

    python bench.py                     # CPU: every figure, a table, the JSON on stdout
    python bench.py --json out.json     # also write the JSON to a file
    python bench.py --quick             # smaller shapes and fewer repeats: a smoke run
    python bench.py --device cuda       # on a GPU: the same pairs, plus VCP/VLT training MFU (bf16)
                                        # and eval clips/s
    python bench.py --only vit,greedy   # some figures only

How: each pair (ours vs transformers) is built once on the same weights (transformers builds
a random model and saves it; ours loads that folder with `from_pretrained`) and checked to
agree before it is timed (that first call is also the warm-up). Then the two sides run
interleaved (ours, theirs, theirs, ours, ...) in this one process, and the figure is the
median of the repeats: a machine whose load changes (another job on the same cores) slows
both sides alike, so the ratio holds even when the absolute numbers move. Ratios are
ours / baseline (transformers for the model pairs), higher is better, except
`load_peak_rss_ratio` (peak resident memory while loading over the checkpoint's size on disk,
lower is better; 1.0 is one copy of the weights).

Threads: all cores when the machine is idle; when other processes keep cores busy, only the
idle ones (--threads=N to choose). An OpenMP thread that loses its core to another process
stalls every parallel op of the others, which makes token-by-token decoding several times
slower and its ratio noise. The JSON records the threads and the load average.

Figures (JSON keys):
  llm_prefill_ratio      forward tokens/s, ~55M-parameter Qwen2 shape, batch 4 x 256, fp32
  llm_greedy_ratio       new tokens/s, greedy, 32-token prompt + 64 new, batch 1 and 8 (key: the smaller)
  llm_beam_ratio         new tokens/s, beam search width 4, 32 new tokens, batch 1 and 4 (key: the smaller)
  vit_ratio              frames/s, DINOv2-S/14 shape at 224 px, batch 16
  vlt_cache_speedup      one connector-stage VLT epoch on cached word features over one that
                         decodes the videos and recomputes the frozen visual encoder every step
  load_peak_rss_ratio    LLM.from_pretrained of a ~500 MB sharded bf16 checkpoint into bf16, in a
                         fresh process: peak RSS (Linux VmHWM) minus RSS after imports, over the size
  loader_png_ratio       frames/s of ClipDataset (VCP train transform, 336 px) on one core over Pillow
  loader_jpeg_ratio      decoding the same frames alone: Phoenix-like 210x260 PNG, CSL-Daily-like 512x512 JPEG
  vcp_mib_per_frame      MiB the ViT-B/14 (336 px, LoRA, bf16 autocast) keeps per frame for the backward pass
                         with grad_checkpointing; vcp_readme_activation_gib: the README's VCP command's estimate
  cuda_*                 (CUDA only) VCP / VLT training MFU in bf16, eval clips/s, and the peak memory of
                         one VCP step at the README's size (cuda_vcp_peak, beside the start-up estimate)

The VLT figure uses the code that trains (feature_cache.py's build_cache and CachedVLTDataset,
train_vlt.py's VideoVLTDataset). train_vcp.py prints `activation_line` (below) at start-up.
Performance is measured here, never asserted in tests.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from model import LLM, LLMConfig

TARGETS = {  # CPU targets of this repository (ratio >= target, except memory: <=)
    "llm_prefill_ratio": 1.0, "llm_greedy_ratio": 1.5, "llm_beam_ratio": 1.5, "vit_ratio": 1.0,
    "vlt_cache_speedup": 10.0, "load_peak_rss_ratio": 1.25, "loader_png_ratio": 0.6, "loader_jpeg_ratio": 0.6,
}
LOWER_IS_BETTER = {"load_peak_rss_ratio"}


# ----------------------------------------------------------------------------- timing

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, warmup: int = 1, device="cpu") -> dict:
    """{name: [seconds of fn() in each round]}: the functions run in turn, `repeats` rounds after
    `warmup` rounds, so slow and fast moments of a shared machine fall on every side alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        # alternate who goes first, so neither side always runs right after the other's
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def timed_pair(times: dict, ours: str, base: str, work: float) -> dict:
    """Rates (work / median seconds) of both sides and their ratio, the median over rounds of
    base_seconds / ours_seconds: the two runs of a round are back to back, so each round's ratio
    sees one load, and a round slowed by another job does not move the median."""
    o, b = statistics.median(times[ours]), statistics.median(times[base])
    ratio = statistics.median(tb / to for to, tb in zip(times[ours], times[base]))
    return dict(ours=work / o, baseline=work / b, ratio=ratio)


def check_close(ours, theirs, what: str, atol: float, rtol: float = 1e-4):
    """The pair must compute the same thing before its speed means anything."""
    try:
        torch.testing.assert_close(ours.float(), theirs.float(), atol=atol, rtol=rtol)
    except AssertionError as e:
        raise AssertionError(f"{what}: ours and transformers disagree, so the timing would compare "
                             f"different computations:\n{e}") from None


# ----------------------------------------------------------------------------- LLM pair

def llm_pair(tmp: str, device, quick: bool):
    """A random Qwen2ForCausalLM (sdpa) and our LLM loaded from its save: the same weights."""
    import transformers
    shape = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2)
    if quick:
        shape.update(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4)
    config = transformers.Qwen2Config(**shape, max_position_embeddings=2048, tie_word_embeddings=False,
                                      rope_theta=1000000.0, use_sliding_window=False,
                                      attn_implementation="sdpa", bos_token_id=None, eos_token_id=None,
                                      pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    folder = os.path.join(tmp, "qwen2")
    hf.save_pretrained(folder)
    ours = LLM.from_pretrained(folder, dtype=torch.float32, device=device)
    hf = hf.to(device)
    # no stop token on either side: both generate exactly max_new_tokens
    hf.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    n_params = sum(p.numel() for p in ours.parameters())
    return hf, ours, n_params


@torch.no_grad()
def bench_llm_prefill(pair, device, quick: bool) -> dict:
    hf, ours, n_params = pair
    B, T = (2, 128) if quick else (4, 256)
    ids = torch.randint(0, ours.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
    check_close(ours(ids), hf(ids).logits, "LLM prefill logits", atol=1e-4)  # also the warm-up
    t = interleaved({"ours": lambda: ours(ids), "transformers": lambda: hf(ids).logits},
                    repeats=5, warmup=0, device=device)
    return dict(**timed_pair(t, "ours", "transformers", B * T), baseline_is="transformers", unit="tokens/s",
                shape=f"{n_params / 1e6:.0f}M params, batch {B} x {T}, fp32")


@torch.no_grad()
def _generation_pair(pair, device, batch: int, prompt: int, new: int, beams: int, repeats: int) -> dict:
    hf, ours, _ = pair
    ids = torch.randint(1, ours.config.vocab_size, (batch, prompt),
                        generator=torch.Generator().manual_seed(2 + batch)).to(device)
    mask = torch.ones_like(ids)

    def run_ours():
        return ours.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], num_beams=beams)

    def run_hf():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           num_beams=beams, use_cache=True, early_stopping=False, length_penalty=1.0)[:, prompt:]

    a, b = run_ours(), run_hf()
    if a.shape != (batch, new) or b.shape != (batch, new):
        raise AssertionError(f"generation: expected {new} new tokens per row, got ours {tuple(a.shape)}, "
                             f"transformers {tuple(b.shape)}")
    same = (a == b).float().mean().item()
    t = interleaved({"ours": run_ours, "transformers": run_hf}, repeats=repeats, warmup=0, device=device)
    return dict(**timed_pair(t, "ours", "transformers", batch * new), same_tokens=round(same, 3))


def bench_llm_greedy(pair, device, quick: bool) -> dict:
    new = 16 if quick else 64
    rows = {f"batch {b}": _generation_pair(pair, device, b, 32, new, 1, r) for b, r in ((1, 5), (8, 3))}
    return _worst(rows, f"greedy, prompt 32 + {new} new tokens, fp32", "new tokens/s")


def bench_llm_beam(pair, device, quick: bool) -> dict:
    new = 8 if quick else 32
    rows = {f"batch {b}": _generation_pair(pair, device, b, 32, new, 4, 3) for b in (1, 4)}
    return _worst(rows, f"beam 4, prompt 32 + {new} new tokens, fp32", "new tokens/s")


def _worst(rows: dict, shape: str, unit: str) -> dict:
    """The row with the smaller ratio holds the figure; every row is kept."""
    worst = min(rows.values(), key=lambda r: r["ratio"])
    return dict(ours=worst["ours"], baseline=worst["baseline"], ratio=worst["ratio"], baseline_is="transformers",
                unit=unit, shape=shape, rows=rows)


# ----------------------------------------------------------------------------- ViT pair

@torch.no_grad()
def bench_vit(tmp: str, device, quick: bool) -> dict:
    """A random transformers Dinov2Model (sdpa) and our ViT loaded from its save."""
    import transformers
    from vision import ViT
    layers, batch, size = (4, 4, 112) if quick else (12, 16, 224)
    config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=layers, num_attention_heads=6,
                                       patch_size=14, image_size=518, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.Dinov2Model(config).eval()
    folder = os.path.join(tmp, "dinov2")
    hf.save_pretrained(folder)
    ours = ViT.from_pretrained(folder, device=device).eval()
    hf = hf.to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3)).to(device)
    check_close(ours(x), hf(pixel_values=x).pooler_output, "ViT CLS features", atol=1e-4)
    t = interleaved({"ours": lambda: ours(x), "transformers": lambda: hf(pixel_values=x).pooler_output},
                    repeats=7, warmup=0, device=device)
    return dict(**timed_pair(t, "ours", "transformers", batch), baseline_is="transformers", unit="frames/s",
                shape=f"DINOv2 384-d x {layers} layers, {size} px, batch {batch}, fp32")


# ----------------------------------------------------------------------------- VLT: cached word features

def _demo_models(data: str, device):
    """The demo's shapes (demo.py): a tokenizer trained on the corpus, a tiny Qwen2 LLM
    (hidden 128, 3 layers) and a VCP encoder (64-d 2-layer ViT on 32 px, flat pooling,
    1 local + 1 full layer of width 128), random weights: speed does not depend on them."""
    from data import system_prompt
    from readers import read_corpus
    from model import Connector, LLaVASLT
    from tokenizer import Tokenizer
    from vision import HierarchicalConfig, VCPConfig, VCPModel, ViTConfig
    rows = read_corpus(os.path.join(data, "corpus.jsonl"))
    texts = [r["text"] for r in rows] + [r["gloss"] for r in rows if "gloss" in r] + [system_prompt("German")]
    tok = Tokenizer.train(texts, vocab_size=8192, kind="wordlevel")
    torch.manual_seed(0)
    llm = LLM(LLMConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=tok.eos_token_ids,
                        bos_token_id=None))
    vit = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=32)
    hier = HierarchicalConfig(dim=128, heads=4, local_layers=1, window=3, full_layers=1, dropout=0.0)
    vcp = VCPModel(VCPConfig(vit=vit, image_size=32, resize=32, stride=2, max_frames=64, frame_pool="flat",
                             vit_tuning="full", hier=hier, clip_dim=128, text_dim=128))
    model = LLaVASLT(llm, Connector(hier.dim, llm.config.hidden_size), vcp).to(device)
    model.requires_grad_(False)
    model.connector.requires_grad_(True)  # the connector stage: LLM and visual encoder frozen
    return tok, model


def _vlt_loaders(rows, features, tok, system, vc, batch_size) -> tuple:
    """The connector stage's batches both ways: cached word features, and the videos decoded
    for the encoder (its config `vc`) to run on every step."""
    from data import ClipDataset, VideoTransform
    from feature_cache import CachedVLTDataset, collate_cached
    from train_vlt import VideoVLTDataset, collate_video
    cached = torch.utils.data.DataLoader(CachedVLTDataset(rows, features, tok, system), batch_size=batch_size,
                                         shuffle=True, collate_fn=lambda items: collate_cached(items, tok.pad_token_id))
    clips = ClipDataset(rows, VideoTransform(vc.image_size, vc.resize, train=False), max_frames=vc.max_frames,
                        stride=vc.stride, train=False)
    videos = VideoVLTDataset(clips, tok, system, lambda T: math.ceil(T / vc.hier.step))
    uncached = torch.utils.data.DataLoader(videos, batch_size=batch_size, shuffle=True,
                                           collate_fn=lambda items: collate_video(items, tok.pad_token_id))
    return cached, uncached


def bench_vlt_cache(tmp: str, device, quick: bool) -> dict:
    """One connector-stage epoch (data + forward + backward + AdamW step) on feature_cache.py's
    cached word features, against one that decodes the videos and runs the frozen visual
    encoder every step (what training without the cache would do). The one-off cache build
    is timed on its own."""
    from data import chat_prefix_ids, system_prompt
    from readers import load_rows
    from synth import synthesize
    from losses import lm_loss
    from model import PrefixCache
    from feature_cache import build_cache
    from cli import Dist
    from training import make_optimizer
    n_train, batch_size = (64, 32) if quick else (256, 64)
    data = os.path.join(tmp, "synth")
    t0 = time.perf_counter()
    synthesize(data, seed=0, n_train=n_train, n_dev=0, n_test=0, n_corpus=400, workers=2, progress=False)
    synth_s = time.perf_counter() - t0
    rows = load_rows(data, "train")
    tok, model = _demo_models(data, device)
    system = system_prompt("German")
    vc = model.visual_encoder.config
    model.visual_encoder.eval()  # frozen: eval mode, as build_cache runs it
    optimizer = make_optimizer(model, 1e-3, 1e-3)
    dist = Dist(device=torch.device(device))

    t0 = time.perf_counter()
    features = build_cache(os.path.join(tmp, "vlt_cache", "train-word.safetensors"), model, rows, dist,
                           batch_size, 0, key="bench")
    cache_s = time.perf_counter() - t0
    cached, uncached = _vlt_loaders(rows, features, tok, system, vc, batch_size)

    parts = {}  # seconds per part of each path, summed over the timed epochs

    def clock(key, t0):
        sync(device)
        parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    # train_vlt.py's connector step: the frozen LLM's keys and values of the shared prompt
    # prefix computed once (the same LLM step in both paths; "no prefix" shows what it saves)
    prefix = PrefixCache(model.llm, chat_prefix_ids(tok, system))

    def step(batch, feats, mask, use_prefix=True):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                       batch["slot_mask"].to(device), feats, mask, prefix=prefix if use_prefix else None)
        loss, _ = lm_loss(logits, batch["labels"][:, -logits.shape[1]:].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def epoch_cached(use_prefix=True):
        name = "cached" if use_prefix else "cached, no prefix"
        t0 = time.perf_counter()
        for batch in cached:
            t0 = clock(f"{name}: data", t0)
            step(batch, batch["word_features"].to(device), batch["word_mask"].to(device), use_prefix)
            t0 = clock(f"{name}: LLM step", t0)

    def epoch_uncached():
        t0 = time.perf_counter()
        for batch in uncached:
            t0 = clock("uncached: data (decode videos)", t0)
            with torch.no_grad():  # the encoder is frozen either way
                feats, mask = model.visual_features(batch["frames"].to(device), batch["frame_mask"].to(device))
            t0 = clock("uncached: visual encoder", t0)
            step(batch, feats, mask)
            t0 = clock("uncached: LLM step", t0)

    # no separate warm-up: building the cache ran the encoder over every video, and the
    # median of five drops a slow first epoch (and the batches differ: shuffled, padded)
    repeats = 5
    t = interleaved({"cached": epoch_cached, "uncached": epoch_uncached, "no_prefix": lambda: epoch_cached(False)},
                    repeats, warmup=0, device=device)
    return dict(**timed_pair(t, "cached", "uncached", n_train), unit="clips/s",
                baseline_is="decoding videos + the frozen visual encoder every step", cache_build_s=round(cache_s, 2),
                synth_s=round(synth_s, 2), epoch_cached_s=round(statistics.median(t["cached"]), 3),
                epoch_uncached_s=round(statistics.median(t["uncached"]), 3),
                epoch_cached_no_prefix_s=round(statistics.median(t["no_prefix"]), 3),
                epoch_parts_s={k: round(v / repeats, 3) for k, v in parts.items()},
                shape=f"{n_train} clips, batch {batch_size}, demo shapes, fp32")


# ----------------------------------------------------------------------------- loading memory

def _write_frames(folder: str, n: int, h: int, w: int, ext: str, seed: int):
    """A clip of `n` frames that compress like filmed ones: a smooth background, a moving
    bright shape (the signer's hands) and mild sensor noise; PNG (Phoenix) or JPEG q95 (CSL-Daily)."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = np.stack([80 + 60 * yy / h, 90 + 40 * xx / w, 110 + 30 * (yy + xx) / (h + w)], -1)
    for i in range(n):
        cy, cx = h * (0.4 + 0.2 * math.sin(i / 5)), w * (0.5 + 0.25 * math.cos(i / 7))
        blob = 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.06 * min(h, w)) ** 2))
        img = np.clip(background + blob[..., None] + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
        name = os.path.join(folder, f"images{i + 1:04d}.{ext}")
        Image.fromarray(img).save(name, **({"quality": 95} if ext == "jpg" else {}))


def bench_loader(tmp: str, quick: bool) -> dict:
    """Frames/s of one process (one core: one torch thread) through ClipDataset with the VCP
    train transform at 336 px (resize 384, crop, rotation, flip, colour jitter), over the
    decode-only limit: Pillow decoding the same files alone. What a DataLoader worker gives."""
    import numpy as np
    from PIL import Image
    from data import ClipDataset, VideoTransform
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows_out = {}
    try:
        for kind, (h, w, ext) in {"png": (260, 210, "png"), "jpeg": (512, 512, "jpg")}.items():
            n_clips, n_frames = (2, 16) if quick else (4, 48)
            rows = []
            for c in range(n_clips):
                folder = os.path.join(tmp, f"loader_{kind}", f"clip{c}")
                _write_frames(folder, n_frames, h, w, ext, seed=c)
                rows.append({"id": f"{kind}{c}", "video": folder, "text": "x"})
            files = [os.path.join(r["video"], f) for r in rows for f in sorted(os.listdir(r["video"]))]
            dataset = ClipDataset(rows, VideoTransform(336, 384, train=True), train=True, seed=0)

            def decode():
                for f in files:
                    with Image.open(f) as im:
                        np.asarray(im.convert("RGB"))

            def load():
                dataset.set_epoch(dataset.epoch + 1)
                for i in range(len(dataset)):
                    dataset[i]
            times = {k: statistics.median(v) for k, v in
                     interleaved({"decode": decode, "load": load}, repeats=3 if quick else 5).items()}
            frames = len(files)
            rows_out[kind] = {"ours": frames / times["load"], "baseline": frames / times["decode"],
                              "ratio": times["decode"] / times["load"]}
    finally:
        torch.set_num_threads(threads)
    return {"ours": rows_out["png"]["ours"], "baseline": rows_out["png"]["baseline"],
            "ratio": rows_out["png"]["ratio"], "jpeg_ratio": rows_out["jpeg"]["ratio"], "rows": rows_out,
            "unit": "frames/s on one core", "baseline_is": "Pillow decoding alone",
            "shape": "336 px VCP train transform; png 210x260 (Phoenix), jpeg 512x512 (CSL-Daily)"}


# ----------------------------------------------------------------------------- activation memory (also train_vcp's)

def kept_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `fn()` runs (each storage
    once, parameters excluded): the activation memory of a forward, on any device."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_estimate(model, frames_per_batch: int, device, precision: str) -> dict:
    """The activation memory of one micro-batch of a VCPModel where it is large (section 3.2: the ViT at
    336 px), measured on one frame: the frames themselves (fp32) and what the ViT keeps for the
    backward pass per frame, times the batch's frames, plus, with grad_checkpointing, the
    recompute of one chunk (--vit_chunk_size frames). The hierarchical encoder's share is
    small beside it (its tokens are the frames' CLS features, not their patches)."""
    from training import autocast
    vit, size = model.vit, model.config.image_size
    x = torch.zeros(2, 3, size, size, device=device)
    was_training, ckpt = vit.training, vit.grad_checkpointing
    vit.train()
    try:
        with autocast(torch.device(device), precision):
            vit.grad_checkpointing = False
            full = (kept_bytes(lambda: vit(x)) - kept_bytes(lambda: vit(x[:1]))) or 1  # per frame: the slope
            vit.grad_checkpointing = ckpt
            per_frame = kept_bytes(lambda: vit(x)) - kept_bytes(lambda: vit(x[:1])) if ckpt else full
    finally:
        vit.grad_checkpointing = ckpt
        vit.train(was_training)
    peak = full * min(vit.chunk_size or frames_per_batch, frames_per_batch) if ckpt else 0
    pixels = 3 * size * size * 4  # one fp32 frame of the batch
    return {"mib_per_frame": per_frame / 2**20, "full_mib_per_frame": full / 2**20,
            "gib": ((per_frame + pixels) * frames_per_batch + peak) / 2**30}


def activation_line(model, config, device) -> str:
    """train_vcp.py's start-up line: the estimate for its longest micro-batch, every clip at
    --max_frames (the VCPModel already on `device`; config: a VCPTrainConfig)."""
    from training import resolve_precision
    est = activation_estimate(model, config.batch_size * config.max_frames, device,
                              resolve_precision(config.precision, device))
    return (f"activation memory estimate (ViT): {est['gib']:.1f} GiB per process for the longest micro-batch "
            f"({config.batch_size} clips x {config.max_frames} frames; {est['mib_per_frame']:.3g} MiB kept per "
            "frame beside its pixels"
            + (f", plus the recompute of {config.vit_chunk_size} frames)" if config.grad_checkpointing else ")"))


def bench_vcp_memory(quick: bool) -> dict:
    """MiB kept for the backward pass per frame by the ViT-B/14 at 336 px with LoRA under bf16
    autocast (the paper's VCP), measured by counting the tensors autograd saves (any device):
    with grad_checkpointing (a chunk is recomputed in the backward pass) and without. And the
    README's VCP command (batch 16 x 256 frames, chunks of 64) by train_vcp's start-up estimate."""
    from vision import HierarchicalConfig, VCPConfig, VCPModel, ViTConfig
    size, layers = (224, 4) if quick else (336, 12)
    est = {}
    for ckpt in (True, False):
        config = VCPConfig(vit=ViTConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                                         patch_size=14, image_size=size), vit_path="", image_size=size, resize=size,
                           vit_tuning="lora", grad_checkpointing=ckpt, vit_chunk_size=64,
                           hier=HierarchicalConfig(dim=768, heads=12))
        est[ckpt] = activation_estimate(VCPModel(config, None), 16 * 256, "cpu", "bf16")
    return {"ours": est[True]["mib_per_frame"], "baseline": est[False]["mib_per_frame"],
            "ratio": est[True]["mib_per_frame"] / est[False]["mib_per_frame"],
            "readme_vcp_gib": est[True]["gib"], "readme_vcp_gib_without_checkpointing": est[False]["gib"],
            "unit": "MiB kept per frame", "baseline_is": "no checkpointing",
            "shape": f"ViT-B/14 {layers} layers, {size} px, LoRA r=8, bf16 autocast; README VCP command: "
                     f"{est[True]['gib']:.1f} GiB of activations per GPU (without checkpointing "
                     f"{est[False]['gib']:.0f} GiB)"}


def write_sharded_checkpoint(folder: str, target_bytes: float, shard_bytes: float = 100e6) -> int:
    """A Qwen2-shaped bf16 checkpoint of about target_bytes in shards, written tensor by tensor
    (random N(0, 0.02) values), so writing it never holds more than one shard. -> bytes on disk."""
    from safetensors.torch import save_file
    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 2 * (hidden * hidden + 2 * hidden * 256 + hidden * hidden + 3 * hidden * inter)  # bf16 bytes
    layers = max(1, round((target_bytes - 2 * 2 * vocab * hidden) / per_layer))
    config = LLMConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                       tie_word_embeddings=False, dtype="bfloat16")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in LLM(config).named_parameters()]
    gen = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        shards.append((name, list(shard)))

    for name, shape in shapes:
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name], size = t, size + t.numel() * 2
    flush()
    weight_map = {key: name for name, keys in shards for key in keys}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return sum(os.path.getsize(os.path.join(folder, name)) for name, _ in shards)


def _proc_status(field: str):
    """A memory line of /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    return _proc_status("VmRSS") or _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process. On Linux VmHWM, not ru_maxrss: the kernel carries
    ru_maxrss across exec, so a child forked from a big parent (this benchmark, holding its
    models) would report the parent's size; VmHWM belongs to the new program alone."""
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def load_child(folder: str):
    """Run in a fresh process (`bench.py --_load_child FOLDER`): load and report memory as JSON."""
    base = _rss_bytes()  # after importing torch and model
    t0 = time.perf_counter()
    llm = LLM.from_pretrained(folder, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    print(json.dumps({"base": base, "peak": _peak_rss_bytes(), "after": _rss_bytes(), "seconds": seconds,
                      "params": sum(p.numel() for p in llm.parameters())}))


def bench_load_rss(tmp: str, quick: bool) -> dict:
    folder = os.path.join(tmp, "sharded_bf16")
    disk = write_sharded_checkpoint(folder, 100e6 if quick else 500e6, shard_bytes=25e6 if quick else 100e6)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_load_child", folder],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        raise RuntimeError(f"the loading subprocess failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = r["peak"] - r["base"]
    n_shards = len([f for f in os.listdir(folder) if f.endswith(".safetensors")])
    return dict(ours=peak / 2**20, baseline=disk / 2**20, baseline_is="checkpoint size on disk",
                unit="MiB (peak RSS over imports / on disk)",
                ratio=peak / disk, resident_after_ratio=round((r["after"] - r["base"]) / disk, 3),
                load_s=round(r["seconds"], 2),
                shape=f"{r['params'] / 1e6:.0f}M params bf16, {n_shards} shards, {disk / 1e6:.0f} MB")


# ----------------------------------------------------------------------------- CUDA: training MFU, eval speed
# MFU = FLOPs of one training step (forward + backward + optimizer, counted by
# torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, attention) / step time /
# the GPU's dense bf16 peak. The frozen parts of each stage get no weight gradients, so their
# backward costs (and counts) only the input gradients.

PEAK_BF16_TFLOPS = [  # dense bf16 tensor-core peaks from the vendor datasheets; first match of the name wins
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
]

LLM_SHAPES = {  # config.json shapes of the paper's LLM family (random weights: speed does not depend on them)
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def peak_bf16_flops(device, override_tflops=None):
    """(FLOP/s, where it came from) of the GPU, or (None, why not)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak_tflops"
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16"
    return None, f"{name}: peak bf16 FLOP/s unknown; pass --peak_tflops=N for MFU"


def _autocast(device):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _llm_bf16(shape: str, device) -> LLM:
    """A random LLM built straight in bf16 on `device` (a 7B model never exists in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return LLM(LLMConfig(model_type="qwen2", **LLM_SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)


def _vcp_model(device, quick: bool):
    """The paper's VCP encoder: DINOv2-B/14 shape + LoRA r=8 on query/value, hierarchical encoder
    4 local + 8 full layers of 768, CLIP space 768 (quick: 2 + 2 layers, 2 ViT layers)."""
    from vision import HierarchicalConfig, VCPConfig, VCPModel, ViTConfig
    vit = ViTConfig(num_hidden_layers=2) if quick else ViTConfig()
    hier = HierarchicalConfig(local_layers=2, full_layers=2) if quick else HierarchicalConfig()
    torch.manual_seed(0)
    return VCPModel(VCPConfig(vit=vit, image_size=112 if quick else 224, hier=hier)).to(device)


def _mfu_row(step, items: int, unit: str, peak, repeats: int, device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    step()  # warm-up: allocator, kernels, optimizer state
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = statistics.median(interleaved({"step": step}, repeats, warmup=1, device=device)["step"])
    row = dict(step_s=round(seconds, 4), tflops_per_step=round(flops / 1e12, 3),
               achieved_tflops=round(flops / seconds / 1e12, 1), **{f"{unit}_per_s": round(items / seconds, 2)})
    if peak is not None:
        row["mfu"] = round(flops / seconds / peak, 4)
    return row


def bench_vcp_mfu(device, quick: bool, peak) -> dict:
    """One VCP step (paper losses: CLIP + 1e-2 SignCL, AdamW) on random frames, bf16 autocast."""
    from losses import clip_loss, signcl_loss
    from training import make_optimizer
    B, T = (2, 8) if quick else (4, 32)
    model = _vcp_model(device, quick).train()
    size = model.config.image_size
    optimizer = make_optimizer(model, 2e-4, 1e-5)
    frames = torch.randn(B, T, 3, size, size, device=device)
    frame_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    text = torch.randn(B, model.config.text_dim, device=device)  # the frozen teacher's embeddings, precomputed
    text_words = torch.full((B,), 12, device=device)

    def step():
        with _autocast(device):
            out = model(frames, frame_mask, text_sentence=text)
            loss = clip_loss(out["video_emb"], out["text_emb"], out["logit_scale"])
            loss = loss + 1e-2 * signcl_loss(out["word_features"], out["word_mask"], text_words)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = _mfu_row(step, B, "clips", peak, 3 if quick else 10, device)
    row["shape"] = (f"{B} clips x {T} frames at {size} px, ViT {model.config.vit.hidden_size}-d x "
                    f"{model.config.vit.num_hidden_layers} + LoRA, bf16 autocast")
    return row


def bench_vcp_peak(device, quick: bool) -> dict:
    """Peak GPU memory of one VCP step at the README's command's size: 16 clips x 256 frames of
    ViT-B/14 at 336 px, LoRA, grad_checkpointing with chunks of 64, bf16 autocast, AdamW; beside
    train_vcp's start-up estimate of the activations (quick: 2 clips x 32 frames)."""
    from losses import clip_loss
    from training import make_optimizer
    from vision import VCPConfig, VCPModel, ViTConfig
    B, T = (2, 32) if quick else (16, 256)
    torch.manual_seed(0)
    model = VCPModel(VCPConfig(vit=ViTConfig(image_size=336), image_size=336, resize=384, vit_tuning="lora",
                               grad_checkpointing=True, vit_chunk_size=64)).to(device).train()
    estimate = activation_estimate(model, B * T, device, "bf16")["gib"]
    optimizer = make_optimizer(model, 2e-4, 1e-5)
    torch.cuda.reset_peak_memory_stats(device)
    frames = torch.randn(B, T, 3, 336, 336, device=device)
    with _autocast(device):
        out = model(frames, torch.ones(B, T, dtype=torch.bool, device=device),
                    text_sentence=torch.randn(B, model.config.text_dim, device=device))
        loss = clip_loss(out["video_emb"], out["text_emb"], out["logit_scale"])
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize(device)
    return {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "activation_estimate_gib": round(estimate, 2), "shape": f"{B} clips x {T} frames, 336 px"}


def _vlt_model(device, llm_shape: str):
    from model import Connector, LLaVASLT
    llm = _llm_bf16(llm_shape, device)
    torch.manual_seed(1)
    model = LLaVASLT(llm, Connector(768, llm.config.hidden_size).to(device))
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    return model


def bench_vlt_mfu(device, llm_shape: str, quick: bool, peak) -> dict:
    """One connector-stage VLT step on cached word features: LLM frozen (bf16 weights), connector
    trained (fp32 master weights), bf16 autocast, loss on the answer tokens."""
    from losses import lm_loss
    from training import make_optimizer
    B, L, N, prefix = (4, 64, 16, 8) if quick else (32, 128, 32, 40)
    model = _vlt_model(device, llm_shape).train()
    optimizer = make_optimizer(model, 1e-3, 1e-3)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.llm.config.vocab_size, (B, L), device=device, generator=g)
    slot_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    slot_mask[:, prefix:prefix + N] = True
    labels = torch.full_like(ids, -100)
    labels[:, prefix + N + 8:] = ids[:, prefix + N + 8:]
    attention_mask = torch.ones_like(ids)
    feats = torch.randn(B, N, 768, device=device, generator=g)
    word_mask = torch.ones(B, N, dtype=torch.bool, device=device)

    def step():
        with _autocast(device):
            logits = model(ids, attention_mask, slot_mask, feats, word_mask)
            loss, _ = lm_loss(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = _mfu_row(step, B * L, "tokens", peak, 3 if quick else 10, device)
    row["shape"] = f"{llm_shape} frozen (bf16), batch {B} x {L} tokens ({N} visual), bf16 autocast"
    return row


@torch.no_grad()
def bench_eval_speed(device, llm_shape: str, quick: bool) -> dict:
    """eval.py's translate on random frames (video decoding excluded): VCP encoder -> word
    features -> connector -> beam search 4, 32 new tokens (no stop token), everything in bf16."""
    from model import Connector, LLaVASLT
    B, T, new = (2, 8, 4) if quick else (16, 64, 32)
    vcp = _vcp_model(device, quick).to(torch.bfloat16).eval()
    llm = _llm_bf16(llm_shape, device).eval()
    model = LLaVASLT(llm, Connector(768, llm.config.hidden_size).to(device, torch.bfloat16), vcp).eval()
    size = vcp.config.image_size
    frames = torch.randn(B, T, 3, size, size, device=device, dtype=torch.bfloat16)
    frame_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    n_words = math.ceil(T / vcp.config.hier.step)
    prefix, suffix = 40, 5
    L = prefix + n_words + suffix
    ids = torch.randint(0, llm.config.vocab_size, (B, L), device=device)
    slot_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    slot_mask[:, prefix:prefix + n_words] = True
    attention_mask = torch.ones_like(ids)

    def translate():
        feats, mask = model.visual_features(frames, frame_mask)
        return model.generate(ids, attention_mask, slot_mask, feats, mask, max_new_tokens=new, num_beams=4,
                              eos_token_id=[], pad_token_id=0)

    seconds = statistics.median(interleaved({"eval": translate}, 2 if quick else 5, warmup=1, device=device)["eval"])
    return dict(clips_per_s=round(B / seconds, 2), batch_s=round(seconds, 3),
                shape=f"{B} clips x {T} frames at {size} px, {llm_shape}, beam 4, {new} new tokens, bf16")


def cuda_figures(device, quick: bool, peak_tflops=None) -> dict:
    """Each figure on its own: one that fails (out of memory, missing kernel) says why and the
    others still run."""
    peak, source = peak_bf16_flops(device, peak_tflops)
    print(f"peak: {source}", flush=True)
    if quick:
        llm_shape = "tiny"
    else:  # the paper's 7B where it fits with room for activations, else its 1.5B sibling
        total = torch.cuda.get_device_properties(device).total_memory if torch.device(device).type == "cuda" else 0
        llm_shape = "qwen2.5-7b" if total >= 60 * 2**30 else "qwen2.5-1.5b"
    out = {"peak_source": source, "llm_shape": llm_shape}
    for name, fn in (("cuda_vcp_train", lambda: bench_vcp_mfu(device, quick, peak)),
                     ("cuda_vlt_train", lambda: bench_vlt_mfu(device, llm_shape, quick, peak)),
                     ("cuda_eval", lambda: bench_eval_speed(device, llm_shape, quick)),
                     ("cuda_vcp_peak", lambda: bench_vcp_peak(device, quick))):
        try:
            out[name] = fn()
        except Exception as e:  # fail soft: report and go on with the next figure
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"{name}: failed ({out[name]['error']}); the other figures still run", flush=True)
        finally:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {out[name]}", flush=True)
    return out


# ----------------------------------------------------------------------------- main

def busy_cores(seconds: float = 1.0):
    """Cores' worth of CPU time other processes use right now (Linux /proc/stat), or None."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def choose_threads(requested: int):
    """(threads, why). All cores on an idle machine; on a busy one only the idle cores: an OpenMP
    thread whose core another process takes stalls every parallel op of the others, which
    makes small-op work (token-by-token decoding) several times slower and its ratios noise."""
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested, "--threads"
    busy = busy_cores()
    if busy is None:
        return cores, f"{cores} cores"
    n = max(1, cores - int(busy + 0.5))
    return n, f"{cores} cores, {busy:.1f} busy with other work"


def run_figure(name: str, fn, results: dict, details: dict):
    t0 = time.perf_counter()
    print(f"{name} ...", flush=True)
    try:
        d = fn()
    except Exception as e:  # one broken figure must not hide the others; the exit status says it
        details[name] = {"error": f"{type(e).__name__}: {e}"}
        results[name] = None
        print(f"  failed: {details[name]['error']}", flush=True)
        return
    d.setdefault("ratio", d["ours"] / d["baseline"])
    d["seconds"] = round(time.perf_counter() - t0, 1)
    details[name], results[name] = d, round(d["ratio"], 3)
    print(f"  {results[name]:.3f} ({d['seconds']:.0f} s)", flush=True)


def _fmt(v) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.3g}"


def print_table(results: dict, details: dict):
    print(f"\n{'figure':<22} {'ours':>14} {'baseline':>14} {'ratio':>7} {'target':>8}  unit / shape")
    for name, ratio in results.items():
        d = details[name]
        if ratio is None:
            print(f"{name:<22} {'error':>14} {'':>14} {'':>7} {'':>8}  {d['error'][:80]}")
            continue
        target = TARGETS.get(name)
        cmp = "<=" if name in LOWER_IS_BETTER else ">="
        met = "" if target is None else (
            " ok" if (ratio <= target if name in LOWER_IS_BETTER else ratio >= target) else " SHORT")
        tgt = f"{cmp}{target:g}" if target is not None else ""
        print(f"{name:<22} {_fmt(d['ours']):>14} {_fmt(d['baseline']):>14} {ratio:>7.3f} {tgt:>8}{met:6} "
              f"{d['unit']}, baseline: {d['baseline_is']}; {d['shape']}")
        for part, seconds in d.get("epoch_parts_s", {}).items():
            print(f"{'  ' + part:<37} {seconds:>7.3f} s/epoch")
        if "cache_build_s" in d:
            print(f"{'  cache build (once)':<37} {d['cache_build_s']:>7.3f} s")
        for row_name, row in d.get("rows", {}).items():
            print(f"{'  ' + row_name:<22} {_fmt(row['ours']):>14} {_fmt(row['baseline']):>14} {row['ratio']:>7.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--json", default="", help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    p.add_argument("--only", default="",
                   help="comma-separated figures: prefill, greedy, beam, vit, vlt, load, loader, memory, cuda")
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 (default): the cores other processes leave idle")
    p.add_argument("--_load_child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._load_child:
        load_child(args._load_child)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device={args.device}: CUDA is not available on this machine; "
              "run without --device for the CPU figures")
        return 1
    only = set(filter(None, args.only.split(",")))
    want = lambda key: not only or key in only  # noqa: E731
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    print(f"bench: {device}, {threads} torch thread(s) ({why}), torch {torch.__version__}, "
          f"load average {load_start[0]:.2f}{', quick' if args.quick else ''}", flush=True)
    results, details = {}, {}
    with tempfile.TemporaryDirectory(prefix="llava-slt-bench-") as tmp:
        if want("prefill") or want("greedy") or want("beam"):
            pair = llm_pair(tmp, device, args.quick)
            for key, fn in (("prefill", bench_llm_prefill), ("greedy", bench_llm_greedy), ("beam", bench_llm_beam)):
                if want(key):
                    run_figure(f"llm_{key}_ratio", lambda: fn(pair, device, args.quick), results, details)
            del pair
        if want("vit"):
            run_figure("vit_ratio", lambda: bench_vit(tmp, device, args.quick), results, details)
        if want("vlt"):
            run_figure("vlt_cache_speedup", lambda: bench_vlt_cache(tmp, device, args.quick), results, details)
        if want("load"):
            run_figure("load_peak_rss_ratio", lambda: bench_load_rss(tmp, args.quick), results, details)
        if want("memory"):
            run_figure("vcp_mib_per_frame", lambda: bench_vcp_memory(args.quick), results, details)
            if results.get("vcp_mib_per_frame") is not None:  # the figure itself, not the ratio
                results["vcp_mib_per_frame"] = round(details["vcp_mib_per_frame"]["ours"], 3)
                gib = details["vcp_mib_per_frame"]["readme_vcp_gib"]
                results["vcp_readme_activation_gib"] = round(gib, 1)
                details["vcp_readme_activation_gib"] = {
                    "ours": gib, "baseline": 80.0, "ratio": gib / 80, "unit": "GiB of activations per GPU",
                    "baseline_is": "an 80 GB GPU",
                    "shape": "the README's VCP command: batch 16 x 256 frames, ViT-B/14 336 px, chunks of 64"}
        if want("loader"):
            run_figure("loader_png_ratio", lambda: bench_loader(tmp, args.quick), results, details)
            if results.get("loader_png_ratio") is not None:
                results["loader_jpeg_ratio"] = round(details["loader_png_ratio"]["jpeg_ratio"], 3)
                details["loader_jpeg_ratio"] = {**details["loader_png_ratio"]["rows"]["jpeg"], "unit": "frames/s on one core",
                                                "baseline_is": "Pillow decoding alone",
                                                "shape": "336 px VCP train transform, jpeg 512x512 (CSL-Daily)"}
        cuda = cuda_figures(device, args.quick, args.peak_tflops) if device.type == "cuda" and want("cuda") else None
    print_table(results, details)
    if cuda is not None:
        print("\nCUDA (bf16):")
        for name in ("cuda_vcp_train", "cuda_vlt_train", "cuda_eval", "cuda_vcp_peak"):
            print(f"  {name:<16} {json.dumps(cuda[name])}")
    import transformers
    if cuda is not None:  # the headline CUDA numbers at the top level too (None where a figure failed)
        results["cuda_vcp_mfu"] = cuda["cuda_vcp_train"].get("mfu")
        results["cuda_vlt_mfu"] = cuda["cuda_vlt_train"].get("mfu")
        results["cuda_eval_clips_per_s"] = cuda["cuda_eval"].get("clips_per_s")
    report = {**results, "details": details, "cuda": cuda, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": threads, "threads_why": why, "torch": torch.__version__,
              "transformers": transformers.__version__,
              "quick": args.quick, "load_average": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
              "seconds": round(time.perf_counter() - t_start, 1)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(f"\n{report['seconds']:.0f} s in all", flush=True)
    return 1 if any(details[k].get("error") for k in details) else 0


if __name__ == "__main__":
    sys.exit(main())
