"""What the three training scripts share (the mechanics behind paper sections 3.1-3.3).

The flags every stage has (TrainConfig), bf16 autocast, AdamW without decay on norms and
embeddings, the one-cycle cosine schedule, fp32 master weights, and `fit`, the one training
loop: DDP, gradient accumulation, clipping, non-finite steps skipped, logging, validation,
checkpoints, exact resume, a time limit. What `train_step` returns and how a step normalises
it (the loss rule): docs/training.md. Off the reading path: cli.py (flags, torchrun processes,
errors), loader.py (resumable batches), checkpoint.py (the folders and the resume state).
"""

import dataclasses
import functools
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from safetensors.torch import save_model
from tqdm import tqdm

import tracking
from checkpoint import (capture_train_state, check_out, record_run, recover_checkpoint, resume_run, save_checkpoint,
                        start_run)
from cli import Dist, resolve_device
from errors import DivergedError, UserError
from loader import Batches, loader_workers, to_device


# ----------------------------------------------------------------------------- config

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Fields every stage shares; a stage's config extends it (dataclass inheritance).

    A subclass that defines `__post_init__` calls `super().__post_init__()`.
    """
    out: str = "out"                     # folder: weights, config.json, train_state/, metrics.jsonl
    epochs: int = 1
    max_steps: int = 0                   # > 0: exactly this many optimizer steps (overrides epochs)
    batch_size: int = 8                  # per process and micro-batch
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 1e-3                     # peak of the one-cycle schedule
    weight_decay: float = 0.0
    pct_start: float = 0.3               # fraction of the steps spent warming up
    div_factor: float = 25.0             # first lr = lr / div_factor
    final_div_factor: float = 1e4        # last lr = first lr / final_div_factor
    max_grad_norm: float = 1.0           # 0: no clipping
    precision: str = "auto"              # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 0
    log_every: int = 10                  # steps between log lines / metrics.jsonl rows
    save_every: int = 0                  # steps between checkpoints; 0: by time only (and at the end)
    save_every_minutes: float = 30.0     # wall-clock minutes between checkpoints; 0: by steps only
    max_nonfinite_steps: int = 20        # non-finite losses/gradients in a row (each skipped) before stopping
    eval_every: int = 0                  # steps between validations on the dev split; 0: none
    patience: int = 0                    # validations without a new best before stopping; 0: never stop early
    resume: bool = False                 # continue from the checkpoint in `out`, if there is one
    time_limit: Optional[float] = None   # seconds of training, then save and stop
    num_workers: int = -1                # loader worker processes; -1: auto (a share of the cores on CUDA, 0 on CPU)
    device: str = "auto"                 # auto (cuda if available) | cpu | cuda | cuda:N
    wandb: str = ""                      # a Weights & Biases project: metrics.jsonl's rows there too (rank 0)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision={self.precision}: expected one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)}: must be at least 1")
        for name in ("epochs", "max_steps", "save_every", "save_every_minutes", "max_grad_norm",
                     "eval_every", "patience"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name}={getattr(self, name)}: must not be negative")
        if self.num_workers < -1:
            raise UserError(f"--num_workers={self.num_workers}: must be -1 (auto) or at least 0")
        if not 0.0 < self.pct_start < 1.0:
            raise UserError(f"--pct_start={self.pct_start}: must be between 0 and 1")
        if self.time_limit is not None and self.time_limit <= 0:
            raise UserError(f"--time_limit={self.time_limit}: must be positive seconds (or none)")
        tracking.check(self.wandb)


# ----------------------------------------------------------------------------- precision / seed

def resolve_precision(precision: str, device) -> str:
    """"auto" -> bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision={precision}: expected one of {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("--precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def autocast(device, precision: str = "auto"):
    """The context the forward pass runs in: autocast to bf16/fp16, or nothing for fp32."""
    p = resolve_precision(precision, device)
    if p == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type,
                          dtype=torch.bfloat16 if p == "bf16" else torch.float16)


def seed_everything(seed: int):
    """python random, numpy and torch (CPU and every CUDA device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- optimizer and schedule

_NO_DECAY_NAMES = ("token", "query", "cls", "position", "logit_scale", "embed")


def decays(name: str, param: torch.Tensor, owner: Optional[nn.Module] = None) -> bool:
    """Whether AdamW's weight decay applies: not to norms, biases, embedding tables, learned
    tokens/queries/positions, the logit scale, or any 1-D/scalar parameter."""
    if param.ndim < 2:
        return False
    if owner is not None and (isinstance(owner, nn.Embedding) or "norm" in type(owner).__name__.lower()):
        return False
    parts = name.lower().split(".")
    leaf, module_name = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if any("norm" in p for p in parts) or "bias" in leaf or "embed" in module_name:
        return False
    # the leaf is the parameter's own name: `query_token`, `cls_token`, `position_embeddings`;
    # a Linear called `query` has the leaf `weight` and decays
    return not any(k in leaf for k in _NO_DECAY_NAMES)


def make_optimizer(model_or_named_params, lr: float, weight_decay: float, betas=(0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, in two groups: with and without decay.

    Takes a module, a {name: param} dict (e.g. `lora_parameters(model)`) or (name, param) pairs.
    The groups keep the parameter names (checked on resume).
    """
    owners = {}
    if isinstance(model_or_named_params, nn.Module):
        module = model_or_named_params
        named = list(module.named_parameters())
        for mname, m in module.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                owners[f"{mname}.{pname}" if mname else pname] = m
    elif isinstance(model_or_named_params, dict):
        named = list(model_or_named_params.items())
    else:
        named = list(model_or_named_params)
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise UserError("make_optimizer: no parameter requires grad, so there is nothing to train")
    decay = [(n, p) for n, p in named if decays(n, p, owners.get(n))]
    no_decay = [(n, p) for n, p in named if not decays(n, p, owners.get(n))]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def lr_at(step: int, total_steps: int, max_lr: float, pct_start: float = 0.3,
          div_factor: float = 25.0, final_div_factor: float = 1e4) -> float:
    """The lr of optimizer step `step` (0-based) of a one-cycle cosine schedule.

    Exactly torch's OneCycleLR(anneal_strategy="cos", three_phase=False) after `step` calls
    of scheduler.step(): cosine warm-up from max_lr/div_factor to max_lr over the first
    pct_start of the steps, then cosine down to max_lr/(div_factor*final_div_factor).
    (OneCycleLR also cycles Adam's beta1 by default; the betas here stay fixed.)
    """
    if not 0 <= step <= total_steps:
        raise ValueError(f"lr_at: step {step} is outside 0..{total_steps}")
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warm_end = float(pct_start * total_steps) - 1      # OneCycleLR's end_step of phase 1
    if step <= warm_end:
        start, end, span, begin = initial_lr, max_lr, warm_end, 0.0
    else:
        start, end, span, begin = max_lr, min_lr, (total_steps - 1) - warm_end, warm_end
    # a zero-length phase is where OneCycleLR divides by zero; it has arrived at its end there
    pct = (step - begin) / span if span != 0 else 1.0
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def trainable_in_fp32(model: nn.Module) -> nn.Module:
    """Master weights: every parameter that trains is made fp32 (frozen ones keep their dtype,
    e.g. a bf16 LLM), the compute runs under autocast. In bf16 (8 bits of mantissa) an AdamW
    step of lr 1e-5 on a weight of 1e-2 is below the spacing of representable values there
    (6e-5), so most of the paper's full-tuning updates would round away. Call it before
    making the optimizer."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 and p.dtype != torch.float64:
            p.data = p.data.float()
    return model


def parameter_counts(model: nn.Module, parts: dict) -> str:
    """One log line of what trains: trainable / frozen parameters per part. `parts`: {label: name
    prefix (or a tuple of them)}, the first match counts a parameter; LoRA adapters are counted
    apart as "<label> LoRA"; what no prefix matches is "other"."""
    counts = {}
    for name, p in model.named_parameters():
        label = next((label for label, prefix in parts.items() if name.startswith(prefix)), "other")
        label += " LoRA" if ".lora_" in name else ""
        counts.setdefault(label, [0, 0])[0 if p.requires_grad else 1] += p.numel()
    return "parameters, trainable / frozen: " + ", ".join(
        f"{label} {t / 1e6:.3g}M / {f / 1e6:.3g}M" for label, (t, f) in counts.items())


# ----------------------------------------------------------------------------- the training loop

def _prepare(model, dataset, collate_fn, drop_last: bool, config: TrainConfig, dist: Optional[Dist], stage: str,
             evaluate, metric: str, find_unused_parameters: bool) -> tuple:
    """The checks, the device, the output folder, the batches and the model as it trains (the
    DDP wrapper under torchrun); -> (dist, precision, batches, total_steps, net)."""
    if evaluate is not None and config.eval_every and not metric:
        raise ValueError("fit: evaluate needs the name of the metric that picks the best checkpoint")
    dist = dist or Dist(device=resolve_device(config.device))
    precision = resolve_precision(config.precision, dist.device)
    if len(dataset) == 0:
        raise UserError("fit: the training dataset is empty")
    model.to(dist.device).train()
    out = os.path.normpath(config.out)
    if dist.is_main:
        recover_checkpoint(out)           # a save a crash interrupted: finish or undo it
    dist.barrier()
    check_out(out, stage)                 # on every rank, so all stop together
    workers = loader_workers(config.num_workers, dist.device, in_memory=getattr(dataset, "in_memory", False))
    batches = Batches(dataset, collate_fn, config.batch_size, workers, config.seed, dist, drop_last)
    total_steps = config.max_steps or config.epochs * batches.batches_per_epoch // config.grad_accum
    if batches.batches_per_epoch == 0:
        raise UserError(f"fit: {len(dataset)} items on {dist.world_size} process(es) fill no batch of "
                        f"--batch_size={config.batch_size} (drop_last); lower the batch size")
    if total_steps < 1:
        raise UserError(f"fit: {len(dataset)} items give no optimizer step with --epochs={config.epochs} "
                        f"--batch_size={config.batch_size} --grad_accum={config.grad_accum} on {dist.world_size} "
                        "process(es); raise epochs or lower the batch")
    net = model if not dist.ddp else nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)
    return dist, precision, batches, total_steps, net


def _resume_or_seed(config: TrainConfig, out: str, optimizer, model, scaler, dist: Dist, batches) -> tuple:
    """(step, best, bad_evals) where the run starts: out/train_state/ restored with --resume
    (checkpoint.resume_run), else 0 with every rank's RNG seeded."""
    resumed = resume_run(out, optimizer, model, scaler, dist, batches) if config.resume else None
    if resumed is None:
        seed_everything(config.seed + dist.rank)   # dropout differs across ranks; the weights already agree
    return resumed or (0, None, 0)


def _accumulate(net, stream, train_step, grad_accum: int, dist: Dist, precision: str, scaler, mode):
    """One accumulation window: forward and backward of `grad_accum` micro-batches. Returns the
    summed losses and counts (float64 tensors, this rank), the mean of the extra logs, and the
    loss mode ("sum": (loss_sum, count) or "mean": (loss, None); the same in every window)."""
    device = dist.device
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    count_acc = torch.zeros((), dtype=torch.float64, device=device)
    logs = {}
    for micro in range(grad_accum):
        batch = to_device(next(stream), device)
        # DDP all-reduces gradients in the backward of the window's last micro-batch only
        sync = not dist.ddp or micro == grad_accum - 1
        with nullcontext() if sync else net.no_sync():
            with autocast(device, precision):
                result = train_step(net, batch)
            loss, count = result[0], result[1]
            if mode is None:
                mode = "mean" if count is None else "sum"
            elif mode != ("mean" if count is None else "sum"):
                raise ValueError("train_step returned count=None for one micro-batch and a count for another")
            # backward of the raw sum (or mean); the normaliser of the whole window is
            # known only after every rank's counts are in, so gradients are scaled afterwards
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_acc += loss.detach().to(torch.float64)
        if count is not None:
            count_acc += torch.as_tensor(count, dtype=torch.float64, device=device)
        for k, v in (result[2] if len(result) > 2 else {}).items():
            logs[k] = logs.get(k, 0.0) + float(v) / grad_accum
    return loss_acc, count_acc, logs, mode


def _scaled_and_clipped(params, scale: float, optimizer, scaler, max_grad_norm: float) -> float:
    """The window's gradients times `scale` (the loss rule), unscaled from fp16, clipped;
    returns their norm, computed even without clipping (max_norm inf) to catch a non-finite
    step. After DDP the gradients are the same on every rank, so is every decision on them."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)
    return nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf).item() if params else 0.0


def _update(optimizer, scaler, apply: bool):
    if apply and scaler is not None:
        scaler.step(optimizer)                # skips the step when fp16 gradients overflowed
    elif apply:
        optimizer.step()
    if scaler is not None:
        scaler.update()                       # after unscale_, also when the step was skipped
    optimizer.zero_grad(set_to_none=True)


def _step(net, stream, train_step, optimizer, scaler, params, config: TrainConfig, dist: Dist, precision: str,
          mode, t_start: float, t_saved: float, accumulate: Optional[Callable] = None) -> tuple:
    """One optimizer step, the same on every rank: the window's forward and backward (`accumulate`,
    default `_accumulate`), the sums over the ranks, the loss rule, clipping, and the update unless
    the step is not finite. -> (mean loss, grad norm, items, logs, not finite, time to stop, time to save, mode)."""
    loss_sum, count, logs, mode = (accumulate or _accumulate)(net, stream, train_step, config.grad_accum, dist,
                                                              precision, scaler, mode)
    now = time.perf_counter()
    stop_here = config.time_limit is not None and now - t_start >= config.time_limit
    save_now = config.save_every_minutes > 0 and now - t_saved >= 60 * config.save_every_minutes
    keys = sorted(logs)
    stats = torch.tensor([0.0, 0.0, float(stop_here), float(save_now)] + [logs[k] for k in keys],
                         dtype=torch.float64, device=dist.device)
    stats[0], stats[1] = loss_sum, count
    if dist.ddp:
        torch_dist.all_reduce(stats)         # sums; every rank then takes the same decisions
    loss_sum, count, stop_here, save_now = stats[0].item(), stats[1].item(), bool(stats[2] > 0), bool(stats[3] > 0)
    logs = {k: v / dist.world_size for k, v in zip(keys, stats[4:].tolist())}
    # the loss rule (docs/training.md): a step minimises sum(loss_sum) / sum(count) over the
    # window and the ranks (DDP averaged the gradients: x world_size / count), or the mean loss
    if mode == "sum":
        scale, mean_loss, items = (dist.world_size / count if count > 0 else 0.0), loss_sum / max(count, 1.0), count
    else:
        scale, mean_loss = 1.0 / config.grad_accum, loss_sum / (config.grad_accum * dist.world_size)
        items = config.batch_size * config.grad_accum * dist.world_size
    grad_norm = _scaled_and_clipped(params, scale, optimizer, scaler, config.max_grad_norm)
    # fp16's GradScaler skips overflowing steps itself (and lowers its scale); elsewhere a
    # non-finite loss or gradient would turn the weights to NaN: skip the step instead
    bad = not math.isfinite(mean_loss) or (scaler is None and not math.isfinite(grad_norm))
    # no update when not finite, or when nothing was supervised in the window
    _update(optimizer, scaler, apply=not bad and not (mode == "sum" and count == 0))
    return mean_loss, grad_norm, items, logs, bad, stop_here, save_now, mode


def _skipped(step: int, loss: float, grad_norm: float, bad_in_row: int, skipped: int, config: TrainConfig,
             saved_at: int, dist: Dist, bar):
    """Say that step `step + 1` was skipped; stop after config.max_nonfinite_steps in a row."""
    dist.log(f"step {step + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite, "
             f"step skipped ({bad_in_row} in a row, {skipped} in all)")
    if bad_in_row >= config.max_nonfinite_steps:
        bar.close()
        raise DivergedError(
            f"{bad_in_row} steps in a row with a non-finite loss or gradient (at step {step + 1}); "
            f"stopped without saving, the last checkpoint in {os.path.normpath(config.out)} is from step "
            f"{saved_at}: lower --lr or check the data")


def _log_step(row: dict, logs: dict, unit: str, total_steps: int, metrics_path: str, dist: Dist):
    """One line of the progress log and one row of metrics.jsonl (rank 0)."""
    if dist.device.type == "cuda":
        row["max_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
    if not dist.is_main:
        return
    _append_row(metrics_path, row)
    extra = "".join(f" | {k} {v:.4g}" for k, v in logs.items())
    mem = f" | mem {row['max_mem_gib']:.1f} GiB" if "max_mem_gib" in row else ""
    dist.log(f"step {row['step']}/{total_steps} | epoch {row['epoch']} | loss {row['loss']:.4f}{extra} | "
             f"lr {row['lr']:.2e} | grad {row['grad_norm']:.3g} | {row[f'{unit}_per_s']:.1f} {unit}/s{mem}")


def _validate(model, evaluate, metric: str, higher_is_better: bool, best, bad_evals: int, step: int, epoch: int,
              total_steps: int, metrics_path: str, dist: Dist) -> tuple:
    """Score the dev set (collective: the same scores on every rank), log them, and keep the
    best: returns (best, validations without a new best, whether this one is the new best)."""
    model.eval()
    scores = evaluate(model)
    model.train()
    value = scores[metric]
    improved = best is None or (value > best["value"] if higher_is_better else value < best["value"])
    best, bad_evals = ({"step": step, "value": value}, 0) if improved else (best, bad_evals + 1)
    if dist.is_main:
        _append_row(metrics_path, {"step": step, "epoch": epoch, **scores, "best_step": best["step"]})
    dist.log(f"step {step}/{total_steps} | dev " + " | ".join(f"{k} {v:.4g}" for k, v in scores.items())
             + (" | new best" if improved else f" | best {best['value']:.4g} at step {best['step']}"))
    return best, bad_evals, improved


def _append_row(path: str, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    tracking.log(row)                         # --wandb: the same row


def _save_whole(model: nn.Module, config: TrainConfig, folder: str):
    """fit's default save_fn: the whole model as model.safetensors, the config as config.json."""
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    save_model(model, os.path.join(folder, "model.safetensors"))


def _log_stop(stopped: str, step: int, total_steps: int, best, bad_evals: int, metric: str, out: str,
              config: TrainConfig, dist: Dist):
    if stopped == "time_limit":
        dist.log(f"time limit of {config.time_limit:g} s reached at step {step}/{total_steps}; saved to {out} "
                 "(continue with --resume=true)")
    if stopped == "patience":
        dist.log(f"no better {metric} on dev in {bad_evals} validations: stopped at step {step}; {out} holds the "
                 f"best, step {best['step']} ({metric} {best['value']:.4g})")


def _records_at_start(out: str, stage: str, config: TrainConfig, dist: Dist, precision: str, step: int):
    """What a run writes as it starts: the run marker (rank 0), out/run.json (how this run was made;
    collective) and, with --wandb, the wandb run."""
    if dist.is_main:
        start_run(out, stage, step)
    info = record_run(out, stage, config, dist, precision, step)
    tracking.start(config.wandb, info, dist, out)


def fit(model: nn.Module, train_step: Callable, dataset, optimizer, config: TrainConfig, dist: Optional[Dist] = None,
        collate_fn: Optional[Callable] = None, save_fn: Optional[Callable[[str], None]] = None,
        unit: str = "items", drop_last: bool = False, find_unused_parameters: bool = False,
        stage: str = "train", evaluate: Optional[Callable[[nn.Module], dict]] = None, metric: str = "",
        higher_is_better: bool = True, accumulate: Optional[Callable] = None) -> dict:
    """Train `model` (the plain module; DDP is wrapped here) on the map-style `dataset` with
    `train_step(model, batch) -> (loss, count[, logs])` (docs/training.md) for config.max_steps
    (or config.epochs) steps or config.time_limit seconds, checkpointing to config.out: weights
    by `save_fn(folder)` (default: model.safetensors + config.json), train_state/ to resume.
    With `evaluate(model) -> {name: float}` and config.eval_every, the folder keeps the best
    `metric`'s weights; config.patience validations without a new best stop the run.
    `accumulate`, with `_accumulate`'s arguments and return, replaces it for every window (VCP's GradCache).
    Returns {"step", "losses", "stopped" (done|time_limit|patience), "skipped", "best"}."""
    dist, precision, batches, total_steps, net = _prepare(model, dataset, collate_fn, drop_last, config, dist,
                                                          stage, evaluate, metric, find_unused_parameters)
    out, metrics_path = os.path.normpath(config.out), os.path.join(config.out, "metrics.jsonl")
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(dist.device.type) if precision == "fp16" else None
    save_fn = save_fn or functools.partial(_save_whole, model, config)
    validating = evaluate is not None and config.eval_every > 0
    step, best, bad_evals = _resume_or_seed(config, out, optimizer, model, scaler, dist, batches)
    _records_at_start(out, stage, config, dist, precision, step)

    def save(step: int, weights: bool = True) -> tuple:
        """weights=False: the resume state only; the folder keeps the best weights so far."""
        extra = {"config": dataclasses.asdict(config), "total_steps": total_steps, "best": best, "bad_evals": bad_evals}
        state = capture_train_state(step, optimizer, model, {"epoch": batches.epoch, "position": batches.position},
                                    dist, scaler, extra=extra)
        if dist.is_main:
            save_checkpoint(out, train_state=state, stage=stage, write=save_fn if weights else None,
                            state_only=not weights)
        dist.barrier()
        return step, time.perf_counter()

    stream = iter(batches)
    bar = tqdm(total=total_steps, initial=step, disable=None if dist.is_main else True, dynamic_ncols=True)
    t_start = t_log = t_saved = time.perf_counter()
    losses, items_since_log, saved_at, stopped, mode, skipped, bad_in_row = [], 0.0, step, "done", None, 0, 0
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    while step < total_steps:
        lr = lr_at(step, total_steps, config.lr, config.pct_start, config.div_factor, config.final_div_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm, items, logs, bad, stop_here, save_now, mode = _step(
            net, stream, train_step, optimizer, scaler, params, config, dist, precision, mode, t_start, t_saved,
            accumulate)
        skipped, bad_in_row = skipped + bad, (bad_in_row + 1) if bad else 0
        if bad:
            _skipped(step, loss, grad_norm, bad_in_row, skipped, config, saved_at, dist, bar)
        step += 1
        losses.append(loss)
        items_since_log += items
        bar.update(1)
        if step % config.log_every == 0 or step == total_steps or stop_here:
            now = time.perf_counter()
            row = {"step": step, "epoch": batches.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "skipped": skipped, f"{unit}_per_s": items_since_log / max(now - t_log, 1e-9),
                   "elapsed_s": now - t_start, **logs}
            _log_step(row, logs, unit, total_steps, metrics_path, dist)
            items_since_log, t_log = 0.0, now
        if validating and (step % config.eval_every == 0 or step == total_steps):
            best, bad_evals, improved = _validate(model, evaluate, metric, higher_is_better, best, bad_evals,
                                                  step, batches.epoch, total_steps, metrics_path, dist)
            if improved:
                saved_at, t_saved = save(step)          # the folder's weights: the best so far
            if config.patience and bad_evals >= config.patience:
                stopped = "patience"
                break
        if stop_here:
            stopped = "time_limit"
            break
        if ((config.save_every and step % config.save_every == 0) or save_now) and saved_at < step < total_steps:
            saved_at, t_saved = save(step, weights=not validating or best is None)
    bar.close()
    if step > saved_at:
        save(step, weights=not validating or best is None)
    _log_stop(stopped, step, total_steps, best, bad_evals, metric, out, config, dist)
    tracking.finish()
    return {"step": step, "losses": losses, "stopped": stopped, "skipped": skipped, "best": best}
