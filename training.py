"""What the three training scripts share (the mechanics behind paper sections 3.1-3.3).

train_cpt.py, train_vcp.py and train_vlt.py each read top to bottom (config -> data ->
model -> optimizer -> `fit` -> done); everything they would otherwise copy lives here once:

    parse_config / cli        typed `--key=value` flags into a config dataclass; one-line errors
    setup_distributed         torchrun/DDP set-up (NCCL on CUDA, gloo on CPU) or a single process
    autocast / seed_everything  bf16 autocast on CUDA (fp16 + GradScaler on request), fp32 on CPU
    make_optimizer / lr_at    AdamW without decay on norms/biases/embeddings; one-cycle cosine lr
    ResumableSampler          DistributedSampler that can start mid-epoch (resume skips, never loads)
    capture_train_state / restore_train_state
                              what a resume needs (the files: checkpoint.py, atomic, no pickle)
    fit                       the one training loop: accumulation, DDP, AMP, clipping, schedule,
                              non-finite steps skipped, logging, checkpoints, exact resume, time limit

How a script uses it:

    cfg = parse_config(VCPConfig, argv)
    check_out(cfg.out, "vcp", data=cfg.data)          # before any work: never a user's folder or an input
    dist = setup_distributed(cfg.device)
    seed_everything(cfg.seed)                         # same initial weights on every rank
    model = VCPModel(...).to(dist.device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    def train_step(model, batch):                     # `model` is the DDP wrapper under torchrun
        out = model(batch["frames"], batch["frame_mask"], batch["text_ids"], batch["text_mask"])
        return clip_loss(...) + 1e-2 * signcl_loss(...), None
    fit(model, train_step, dataset, optimizer, cfg, dist, collate_fn=collate_clips,
        save_fn=model.save, unit="clips", stage="vcp")
    cleanup()

The loss rule (what `train_step(model, batch)` returns; optionally a third element, a dict of
extra scalars to log):
- `(loss_sum, count)`: the loss summed over this micro-batch's local items (supervised
  tokens, clips) and their number. A step minimises (sum of every loss_sum) / (sum of every
  count) over the whole accumulation window on all ranks, so 2 processes x batch b, 1 process
  x batch 2b and 1 process x batch b x grad_accum 2 take the same step.
- `(loss, None)`: a mean loss. A step minimises its mean over the ranks and the window:
  DDP averages the gradients, nothing else is scaled. A term over the global batch (CLIP)
  gathers the other ranks' features with `losses.all_gather`, whose backward sends every
  rank's gradient to the rows' own rank, so every rank may compute the same global loss; a
  term over this rank's items (SignCL) is simply added. No loss and no script knows the
  world size. The logged loss is that same mean over ranks.
The optional third element, {name: scalar}, is logged as the mean over micro-batches and
ranks (e.g. {"clip": ..., "signcl": ...} to see the parts of a mixed loss exactly).
`train_step` must call `model(...)` itself (the DDP wrapper's forward) so gradients sync.

Resume is exact (same losses, bit for bit on CPU) for the same world size when the data's
randomness comes from the main process (num_workers=0) or is seeded per sample; with
workers the epoch order and the resume point are still exact.

Also: `fit` takes the plain module (it wraps DDP itself) and a map-style dataset (it makes
the sampler and loader); train_state/ holds a copy of the trainable parameters, so a full
fine-tune's checkpoint is twice its weights on disk; with fp16 the backward runs on the
un-normalised loss sum, so GradScaler backs off for its first few steps (bf16 is the default).
"""

import dataclasses
import json
import math
import os
import random
import sys
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from safetensors.torch import save_model
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from checkpoint import (KEEP, TRAIN_STATE, _read_train_state, _write_json, check_out, load_checkpoint,  # noqa: F401
                        recover_checkpoint, save_checkpoint)
from hf import RUN_MARKER, CheckpointError, checkpoint_folder  # noqa: F401  (tests and scripts read them here)
from model import copy_strict


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
    num_workers: int = -1                # DataLoader worker processes; -1: auto (a share of the cores on CUDA, 0 on CPU)
    device: str = "auto"                 # auto (cuda if available) | cpu | cuda | cuda:N

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision={self.precision}: expected one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: must be at least 1")
        for name in ("epochs", "max_steps", "save_every", "save_every_minutes", "max_grad_norm",
                     "eval_every", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)}: must not be negative")
        if self.num_workers < -1:
            raise ValueError(f"--num_workers={self.num_workers}: must be -1 (auto) or at least 0")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"--pct_start={self.pct_start}: must be between 0 and 1")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"--time_limit={self.time_limit}: must be positive seconds (or none)")


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or none" if len(inner) < len(args) else "")
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (tuple, list):
        elem = args[0] if args else str
        return f"comma-separated {_type_name(elem)}"
    if tp is bool:
        return "bool (true/false/1/0/yes/no)"
    return getattr(tp, "__name__", str(tp))


def _parse_value(key: str, text: str, tp):
    """`text` as a value of type `tp`; a ValueError naming the flag and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"--{key}={text}: expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):          # Optional[X]
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        if len(inner) != 1:
            raise TypeError(f"parse_config: field {key}: unions other than Optional[X] are not supported")
        try:
            return _parse_value(key, text, inner[0])
        except ValueError:
            raise bad from None
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise bad
    if origin in (tuple, list):
        items = [s.strip() for s in text.split(",")] if text.strip() else []
        if origin is tuple and args and args[-1] is not Ellipsis:   # fixed length, e.g. tuple[float, float]
            if len(items) != len(args):
                raise ValueError(f"--{key}={text}: expected {len(args)} comma-separated values")
            types_ = args
        else:
            types_ = [args[0] if args else str] * len(items)
        try:
            values = [_parse_value(key, s, t) for s, t in zip(items, types_)]
        except ValueError:
            raise bad from None
        return tuple(values) if origin is tuple else values
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:                                          # 1e4 is a fine way to write 10000
                f = float(text)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
            raise bad from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise bad from None
    if tp is str:
        return text
    raise TypeError(f"parse_config: field {key} has the unsupported type {tp}")


def config_help(cls) -> str:
    """One line per field: flag, type, default (and `metadata={"help": ...}` when a field has it)."""
    hints = typing.get_type_hints(cls)
    lines = [f"options of {cls.__name__} (--key=value or --key value):"]
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        help_ = f"  {f.metadata['help']}" if "help" in f.metadata else ""
        lines.append(f"  --{f.name:<20} {_type_name(hints[f.name]):<32} {default}{help_}")
    return "\n".join(lines)


def parse_config(cls, argv: Optional[list] = None):
    """`--key=value` / `--key value` flags (argv defaults to sys.argv[1:]) into `cls(...)`.

    Types follow the field annotations: int, float, str, bool (true/false/1/0/yes/no; a bare
    `--flag` is true), Optional[X] ("none" is None), Literal[...], tuple/list of X
    (comma-separated). `-h`/`--help` prints the fields and exits. Unknown keys and bad values
    raise a one-line ValueError (the valid keys / the expected type).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    values = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(config_help(cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are written --key=value")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown option --{key}; valid options: " + " ".join(f"--{n}" for n in names))
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if hints[key] is bool and (nxt is None or nxt.lower() not in _TRUE + _FALSE):
                text = "true"                                 # bare --flag
            elif nxt is None or nxt.startswith("--"):
                raise ValueError(f"--{key} needs a value ({_type_name(hints[key])})")
            else:
                text, i = nxt, i + 1
        values[key] = _parse_value(key, text, hints[key])
    missing = [f.name for f in fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError("missing required option(s): " + " ".join(f"--{n}=..." for n in missing))
    return cls(**values)


def config_from_dict(cls, d: dict):
    """Rebuild a config from its config.json dict (lists back to tuples); unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}")
    return cls(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple and isinstance(v, list) else v
                  for k, v in d.items()})


def cli(main: Callable, argv: Optional[list] = None):
    """Run `main(argv)` as a command: a user error (ValueError, FileNotFoundError, a checkpoint
    whose keys do not fit, FloatingPointError of a diverged run) prints one line `error: ...`
    and exits 1 instead of a traceback; anything else (a bug) shows its traceback.
    LLAVA_SLT_DEBUG=1 shows the traceback always. The process group, if any, is torn down."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (ValueError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        if os.environ.get("LLAVA_SLT_DEBUG"):
            raise
        msg = str(e)
        if "\nOriginal Traceback" in msg:
            # raised in a DataLoader worker: torch re-raises it with the worker's traceback in the
            # message; its last line is the error itself ("module.Error: message")
            msg = msg.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    finally:
        cleanup()


# ----------------------------------------------------------------------------- distributed / precision / seed

@dataclass
class Dist:
    """Where this process stands: rank, world_size, local_rank, device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.ddp:
            torch_dist.barrier()

    def log(self, *args):
        """print on rank 0 only (through tqdm, so a progress bar is not torn)."""
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device={device}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: CUDA is not available on this machine (use --device=cpu)")
    return dev


def setup_distributed(device: str = "auto") -> Dist:
    """Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): join the process group, NCCL with one
    GPU per process (cuda:LOCAL_RANK) or gloo on CPU. Otherwise a single process on `device`."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=resolve_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        # rank 0 writes checkpoints while the others wait in a barrier: allow a long save
        kwargs = dict(device_id=dev) if dev.type == "cuda" else {}
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                      timeout=timedelta(minutes=30), **kwargs)
    return Dist(rank, world_size, local_rank, dev)


def cleanup():
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def resolve_precision(precision: str, device) -> str:
    """"auto" -> bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision={precision}: expected one of {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("--precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
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


def rng_state(device=None) -> dict:
    """Every RNG a training step may draw from; torch states as tensors, the rest JSON-able."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    cuda = torch.device(device).type == "cuda" if device is not None else False
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if cuda else None,
            "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": [version, list(internal), gauss]}


def set_rng_state(state: dict, device=None):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


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
        raise ValueError("make_optimizer: no parameter requires grad, so there is nothing to train")
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


# ----------------------------------------------------------------------------- resumable sampling

class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (the same order for a seed and epoch: a permutation padded to
    a multiple of the world size, every world_size-th index for this rank) that starts at
    `start_index` of this rank's share, so a resumed run continues the epoch where it stopped
    without loading the samples before that point. State = (epoch, start_index)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0):
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"ResumableSampler: start_index {start_index} is outside 0..{self.num_samples}")
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def loader_workers(num_workers: int, device, in_memory: bool = False) -> int:
    """--num_workers, with -1 resolved: on CUDA the processes on this machine share its cores,
    one each kept for the training process, at most 8 (decoding 336 px PNG/JPEG frames is what
    feeds a GPU; one process would starve it); on the CPU, 0 (workers would take the cores the
    model computes on). A dataset that keeps its data in memory (`dataset.in_memory`, e.g.
    cache_videos) is read in the main process: each worker would hold its own copy."""
    if num_workers >= 0:
        return num_workers
    if in_memory or torch.device(device).type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 2) // local - 1))


def _seed_worker(worker_id: int):
    # torch seeds python `random` and torch in each worker; numpy needs it too
    np.random.seed(torch.initial_seed() % 2**32)


class _WithEpoch(torch.utils.data.Dataset):
    """The dataset, read by (epoch, index): a worker that lives across epochs (persistent
    workers) holds its own copy of the dataset, so the epoch of its per-(seed, epoch, index)
    random draws comes with each index instead of from `set_epoch` in the main process."""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


class _EpochIndices(torch.utils.data.Sampler):
    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return ((self.sampler.epoch, i) for i in self.sampler)


class _Batches:
    """Endless micro-batches, epoch after epoch; `epoch` and `position` (this rank's samples
    consumed in the epoch) say where it stands after the last batch handed out. One
    DataLoader for the whole run: its workers (if any) persist across epochs."""

    def __init__(self, dataset, collate_fn, batch_size: int, num_workers: int, seed: int, dist: Dist,
                 drop_last: bool = False, epoch: int = 0, position: int = 0):
        self.dataset, self.collate_fn, self.drop_last = dataset, collate_fn, drop_last
        self.batch_size, self.num_workers, self.seed, self.dist = batch_size, num_workers, seed, dist
        self.sampler = ResumableSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=seed)
        self.epoch, self.position = epoch, position

    @property
    def batches_per_epoch(self) -> int:
        n = self.sampler.num_samples / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        # the loader's own generator, so that making it draws nothing from the global RNG
        # (a resumed run makes its loader at another moment than the uninterrupted one)
        seq = np.random.SeedSequence([self.seed, self.epoch, self.dist.rank]).generate_state(1)[0]
        loader = DataLoader(_WithEpoch(self.dataset), batch_size=self.batch_size, sampler=_EpochIndices(self.sampler),
                            collate_fn=self.collate_fn, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0, pin_memory=self.dist.device.type == "cuda",
                            drop_last=self.drop_last, generator=torch.Generator().manual_seed(int(seq)),
                            worker_init_fn=_seed_worker)
        while True:
            self.sampler.set_epoch(self.epoch, self.position)   # read by the loader's next pass
            for batch in loader:
                self.position = min(self.position + self.batch_size, self.sampler.num_samples)
                yield batch
            self.epoch, self.position = self.epoch + 1, 0


def to_device(batch, device):
    """Tensors inside dicts/lists/tuples moved to `device`; everything else as it is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def trainable_parameters(model: nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


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


def capture_train_state(step: int, optimizer, model: nn.Module, sampler_state: dict, dist: Dist,
                        scaler=None, extra: Optional[dict] = None) -> dict:
    """Everything a resume needs, in memory. Collective under DDP (every rank's RNG is gathered
    to all), so every rank calls it; only rank 0 then writes it."""
    rng = rng_state(dist.device)
    if dist.ddp:
        every = [None] * dist.world_size
        torch_dist.all_gather_object(every, {k: v.cpu() if torch.is_tensor(v) else v for k, v in rng.items()})
        rng = every
    else:
        rng = [rng]
    return {"step": step, "world_size": dist.world_size, "sampler": dict(sampler_state, world_size=dist.world_size),
            "scaler": scaler.state_dict() if scaler is not None else None, "optimizer": optimizer.state_dict(),
            "rng": rng, "trainable": {n: p.detach() for n, p in trainable_parameters(model).items()},
            "extra": extra or {}}


def restore_train_state(state: dict, optimizer=None, model: Optional[nn.Module] = None,
                        sampler: Optional[ResumableSampler] = None, scaler=None, dist: Optional[Dist] = None) -> dict:
    """Put a `load_checkpoint(...)["train_state"]` back: the trainable weights into `model`,
    the optimizer, the GradScaler, this rank's RNG, the sampler's (epoch, position).
    Returns {"step", "epoch", "position"} (the position converted if the world size changed)."""
    dist = dist or Dist()
    path = state.get("path", TRAIN_STATE)
    if model is not None:
        copy_strict(trainable_parameters(model), state["trainable"], os.path.join(path, "trainable.safetensors"))
    if optimizer is not None:
        _load_optimizer(optimizer, state["optimizer"], os.path.join(path, "optimizer.safetensors"))
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if dist.rank < len(state["rng"]):
        set_rng_state(state["rng"][dist.rank], dist.device)
    else:   # more ranks than when saved: a fresh but deterministic stream for the new ones
        seed_everything(1_000_003 * state["step"] + dist.rank)
    epoch, position = state["sampler"]["epoch"], state["sampler"]["position"]
    saved_world = state["sampler"].get("world_size", dist.world_size)
    if saved_world != dist.world_size:     # the first position*saved_world samples of the epoch are done
        position = position * saved_world // dist.world_size
    if sampler is not None:
        sampler.set_epoch(epoch, min(position, sampler.num_samples))
    return {"step": state["step"], "epoch": epoch, "position": position}


def _load_optimizer(optimizer, saved: dict, where: str):
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise ValueError(f"{where}: {len(saved['param_groups'])} parameter groups, the optimizer has {len(groups)}")
    flat = [p for g in groups for p in g["params"]]
    for i, (sg, g) in enumerate(zip(saved["param_groups"], groups)):
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"{where}: group {i} holds {len(sg['params'])} parameters, "
                             f"the optimizer's {len(g['params'])}")
        if "param_names" in sg and "param_names" in g and sg["param_names"] != g["param_names"]:
            a, b = next((a, b) for a, b in zip(sg["param_names"], g["param_names"]) if a != b)
            raise ValueError(f"{where}: group {i} has {a} where the optimizer has {b}")
    names = [n for g in groups for n in g.get("param_names", [None] * len(g["params"]))]
    for idx, entries in saved["state"].items():
        for k, v in entries.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape != flat[idx].shape:
                raise ValueError(f"{where}: state.{idx}.{k} has shape {tuple(v.shape)}, "
                                 f"parameter {idx} ({names[idx]}) has {tuple(flat[idx].shape)}")
    optimizer.load_state_dict(saved)


# ----------------------------------------------------------------------------- the training loop

def _truncate_metrics(path: str, step: int):
    """Drop metrics rows past `step` (written after the checkpoint a resume starts from)."""
    if not os.path.isfile(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:        # a line torn by a kill
                continue
            if row.get("step", 0) <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(rows)


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
    """The window's gradients times `scale` (see the loss rule), unscaled from fp16, clipped;
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


def _resume_or_seed(cfg: TrainConfig, out: str, optimizer, model, scaler, dist: Dist, batches) -> tuple:
    """(step, best, bad_evals) where the run starts: restored from out/train_state/ with
    --resume (weights, optimizer, RNG, the data position, validation's best so far), else 0
    with every rank's RNG seeded."""
    resume_from = os.path.join(out, TRAIN_STATE)
    if cfg.resume and os.path.isdir(resume_from):
        state = _read_train_state(resume_from)
        where = restore_train_state(state, optimizer, model, scaler=scaler, dist=dist)   # sets the RNG last
        batches.epoch, batches.position = where["epoch"], where["position"]
        dist.log(f"resumed from {resume_from} at step {where['step']} (epoch {batches.epoch}, "
                 f"sample {batches.position})")
        return where["step"], state["extra"].get("best"), state["extra"].get("bad_evals", 0)
    if cfg.resume:
        dist.log(f"--resume: no checkpoint in {out}, starting at step 0")
    seed_everything(cfg.seed + dist.rank)   # dropout differs across ranks; the weights already agree
    return 0, None, 0


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


def fit(model: nn.Module, train_step: Callable, dataset, optimizer, cfg: TrainConfig, dist: Optional[Dist] = None,
        collate_fn: Optional[Callable] = None, save_fn: Optional[Callable[[str], None]] = None,
        unit: str = "items", drop_last: bool = False, find_unused_parameters: bool = False,
        stage: str = "train", evaluate: Optional[Callable[[nn.Module], dict]] = None, metric: str = "",
        higher_is_better: bool = True) -> dict:
    """Train `model` on `dataset` with `train_step(model, batch) -> (loss, count[, logs])`
    (see the loss rule at the top of this file) until cfg.max_steps (or cfg.epochs) optimizer
    steps or cfg.time_limit seconds, checkpointing to cfg.out.

    save_fn(folder) writes the stage's weights and config.json into a checkpoint folder
    (default: the whole model as model.safetensors and cfg as config.json); the trainable
    parameters also go into train_state/ so a resume does not depend on that format.
    Every rank's k-th micro-batch has the same size (the sampler pads the epoch to a multiple
    of the world size); drop_last=True drops each epoch's short last batch (contrastive losses).
    `stage` names the run in the output folder's marker: only a run of the same stage replaces it.
    A step whose loss or gradient norm is not finite is skipped (never applied, never saved);
    cfg.max_nonfinite_steps of them in a row stop the run with the last checkpoint kept.
    Validation (the paper trains "until validation performance stops improving"): with
    `evaluate(model) -> {name: float}` (called on every rank; it splits the dev set across
    ranks and returns the same scores on all) and cfg.eval_every, the scores are logged, the
    folder's weights are those of the best `metric` so far (train_state/ is always the last
    step's, so a resume continues where the run stopped and keeps the best so far), and
    cfg.patience validations without a new best stop the run.
    Returns {"step", "losses" (one per step of this run), "stopped" ("done"|"time_limit"|
    "patience"), "skipped" (non-finite steps), "best" ({"step", "value"} or None)}.
    """
    if evaluate is not None and cfg.eval_every and not metric:
        raise ValueError("fit: evaluate needs the name of the metric that picks the best checkpoint")
    dist = dist or Dist(device=resolve_device(cfg.device))
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    if len(dataset) == 0:
        raise ValueError("fit: the training dataset is empty")
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    out, metrics_path = os.path.normpath(cfg.out), os.path.join(cfg.out, "metrics.jsonl")
    if dist.is_main:
        recover_checkpoint(out)           # a save a crash interrupted: finish or undo it
    dist.barrier()
    check_out(out, stage)                 # on every rank, so all stop together

    workers = loader_workers(cfg.num_workers, device, in_memory=getattr(dataset, "in_memory", False))
    batches = _Batches(dataset, collate_fn, cfg.batch_size, workers, cfg.seed, dist, drop_last)
    total_steps = cfg.max_steps or cfg.epochs * batches.batches_per_epoch // cfg.grad_accum
    if batches.batches_per_epoch == 0:
        raise ValueError(f"fit: {len(dataset)} items on {dist.world_size} process(es) fill no batch of "
                         f"--batch_size={cfg.batch_size} (drop_last); lower the batch size")
    if total_steps < 1:
        raise ValueError(f"fit: {len(dataset)} items give no optimizer step with --epochs={cfg.epochs} "
                         f"--batch_size={cfg.batch_size} --grad_accum={cfg.grad_accum} on {dist.world_size} "
                         "process(es); raise epochs or lower the batch")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    net = model
    if dist.ddp:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=find_unused_parameters)

    validating = evaluate is not None and cfg.eval_every > 0
    step, best, bad_evals = _resume_or_seed(cfg, out, optimizer, model, scaler, dist, batches)
    if dist.is_main:
        if not os.path.isdir(out) or not os.listdir(out):   # ours from the first line of metrics on
            os.makedirs(out, exist_ok=True)
            _write_json(os.path.join(out, RUN_MARKER), {"stage": stage, "files": list(KEEP)})
        _truncate_metrics(metrics_path, step)

    def save(step: int, weights: bool = True):
        """weights=False: the resume state only; the folder keeps the best weights so far."""
        state = capture_train_state(step, optimizer, model, {"epoch": batches.epoch, "position": batches.position},
                                    dist, scaler, extra={"config": dataclasses.asdict(cfg), "total_steps": total_steps,
                                                         "best": best, "bad_evals": bad_evals})
        if dist.is_main:
            if not weights:
                save_checkpoint(out, train_state=state, stage=stage, state_only=True)
            elif save_fn is not None:
                save_checkpoint(out, train_state=state, write=save_fn, stage=stage)
            else:
                save_checkpoint(out, config=dataclasses.asdict(cfg), train_state=state, stage=stage,
                                write=lambda d: save_model(model, os.path.join(d, "model.safetensors")))
        dist.barrier()

    stream = iter(batches)
    bar = tqdm(total=total_steps, initial=step, disable=None if dist.is_main else True, dynamic_ncols=True)
    t_start = t_log = time.perf_counter()
    items_since_log, losses, saved_at, stopped, mode = 0.0, [], step, "done", None
    skipped, bad_in_row, t_saved = 0, 0, t_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total_steps:
        lr = lr_at(step, total_steps, cfg.lr, cfg.pct_start, cfg.div_factor, cfg.final_div_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_acc, count_acc, logs, mode = _accumulate(net, stream, train_step, cfg.grad_accum, dist, precision,
                                                      scaler, mode)
        now = time.perf_counter()
        stop_here = cfg.time_limit is not None and now - t_start >= cfg.time_limit
        save_now = cfg.save_every_minutes > 0 and now - t_saved >= 60 * cfg.save_every_minutes
        keys = sorted(logs)
        stats = torch.tensor([0.0, 0.0, float(stop_here), float(save_now)] + [logs[k] for k in keys],
                             dtype=torch.float64, device=device)
        stats[0], stats[1] = loss_acc, count_acc
        if dist.ddp:
            torch_dist.all_reduce(stats)         # sums; every rank then takes the same decisions
        loss_sum, count, stop_here, save_now = stats[0].item(), stats[1].item(), stats[2] > 0, stats[3] > 0
        logs = {k: v / dist.world_size for k, v in zip(keys, stats[4:].tolist())}
        if mode == "sum":
            # DDP averaged the gradients over ranks: x world_size / (every item of the window)
            scale, mean_loss, items = (dist.world_size / count if count > 0 else 0.0), loss_sum / max(count, 1.0), count
        else:
            # a mean: DDP averaged it over ranks already; the window's micro-batches are summed
            scale, mean_loss = 1.0 / cfg.grad_accum, loss_sum / (cfg.grad_accum * dist.world_size)
            items = cfg.batch_size * cfg.grad_accum * dist.world_size
        grad_norm = _scaled_and_clipped(params, scale, optimizer, scaler, cfg.max_grad_norm)
        # fp16's GradScaler skips overflowing steps itself (and lowers its scale); elsewhere a
        # non-finite loss or gradient would turn the weights to NaN: skip the step instead
        bad = not math.isfinite(mean_loss) or (scaler is None and not math.isfinite(grad_norm))
        skipped, bad_in_row = skipped + bad, (bad_in_row + 1) if bad else 0
        if bad:
            dist.log(f"step {step + 1}: loss {mean_loss:.4g}, gradient norm {grad_norm:.4g}: not finite, "
                     f"step skipped ({bad_in_row} in a row, {skipped} in all)")
            if bad_in_row >= cfg.max_nonfinite_steps:
                bar.close()
                raise FloatingPointError(
                    f"{bad_in_row} steps in a row with a non-finite loss or gradient (at step {step + 1}); "
                    f"stopped without saving, the last checkpoint in {out} is from step {saved_at}: "
                    "lower --lr or check the data")
        # no update when not finite, or when nothing was supervised in the window
        _update(optimizer, scaler, apply=not bad and not (mode == "sum" and count == 0))
        step += 1
        losses.append(mean_loss)
        items_since_log += items
        bar.update(1)

        if step % cfg.log_every == 0 or step == total_steps or stop_here:
            now = time.perf_counter()
            row = {"step": step, "epoch": batches.epoch, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                   "skipped": skipped,
                   f"{unit}_per_s": items_since_log / max(now - t_log, 1e-9), "elapsed_s": now - t_start, **logs}
            items_since_log, t_log = 0.0, now
            _log_step(row, logs, unit, total_steps, metrics_path, dist)
        if validating and (step % cfg.eval_every == 0 or step == total_steps):
            best, bad_evals, improved = _validate(model, evaluate, metric, higher_is_better, best, bad_evals,
                                                  step, batches.epoch, total_steps, metrics_path, dist)
            if improved:
                save(step)                            # the folder's weights: the best so far
                saved_at, t_saved = step, time.perf_counter()
            if cfg.patience and bad_evals >= cfg.patience:
                stopped = "patience"
                break
        if stop_here:
            stopped = "time_limit"
            break
        if ((cfg.save_every and step % cfg.save_every == 0) or save_now) and step < total_steps and saved_at < step:
            save(step, weights=not validating or best is None)
            saved_at, t_saved = step, time.perf_counter()
    bar.close()
    if step > saved_at:
        save(step, weights=not validating or best is None)
    if stopped == "time_limit":
        dist.log(f"time limit of {cfg.time_limit:g} s reached at step {step}/{total_steps}; saved to {out} "
                 "(continue with --resume=true)")
    if stopped == "patience":
        dist.log(f"no better {metric} on dev in {bad_evals} validations: stopped at step {step}; {out} holds the "
                 f"best, step {best['step']} ({metric} {best['value']:.4g})")
    return {"step": step, "losses": losses, "stopped": stopped, "skipped": skipped, "best": best}
