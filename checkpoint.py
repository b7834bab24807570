"""Checkpoint folders of the training runs, off the reading path: atomic saves, the marker
that tells a run's folders from a user's, and the resume state, all safetensors and JSON.

    check_out(out, stage, **inputs)   before any work: a folder this run may write (never a
                                      user's folder, another stage's output or an input)
    start_run(out, stage, step)       the marker of a new run; metrics rows past a resume dropped
    resume_run(out, optimizer, ...)   a run put back where its last checkpoint was
    save_checkpoint / load_checkpoint one folder: weights, config.json, marker, train_state/
    recover_checkpoint                finish what a kill during a save left
    capture_train_state / restore_train_state
                                      what an exact resume needs, in memory: trainable weights,
                                      optimizer, GradScaler, every rank's RNG, the data position
    record_run / record_eval          run.json: how a run was made (config, git commit, versions,
                                      devices, batches, precision, every start of the run)
"""

import dataclasses
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors.torch import save_file

from errors import MissingFileError, UserError
from hf import RUN_MARKER, checkpoint_folder, copy_strict, is_ours, read_json, read_safetensors

# A checkpoint is a folder: the stage's weights (`model.safetensors` or whatever the script's
# writer puts there), `config.json`, `llava_slt_run.json` (the marker: which stage wrote the
# folder and which names in it are the run's) and `train_state/` for resuming:
#   state.json            step, sampler (epoch, position, world_size), GradScaler, optimizer
#                         param_groups, python/numpy RNG per rank, extra (the training config)
#   optimizer.safetensors state.{param_index}.{exp_avg|exp_avg_sq|step}
#   rng.safetensors       rank{r}.torch, rank{r}.cuda
#   trainable.safetensors every parameter that requires grad, by name (what resume loads back)
# It is written to FOLDER.tmp-XXXX beside the target; then FOLDER -> FOLDER.old,
# FOLDER.tmp-XXXX -> FOLDER, FOLDER.old removed. A kill at any moment leaves either FOLDER or
# only FOLDER.old whole: readers then read FOLDER.old (`hf.checkpoint_folder`), training puts
# it back (`recover_checkpoint`). Nothing is pickled. A user's folder (no marker) is never
# replaced, and a user's file put into one of ours is carried into every new save.

TRAIN_STATE = "train_state"
FORMAT = 1
RUN_INFO = "run.json"     # how the run was made (`record_run`)
KEEP = ("metrics.jsonl", RUN_INFO)  # written by `fit` straight into the folder, between saves: every save keeps it
PARTIAL = ".llava_slt-partial"  # write_json_atomic's file before its rename: a kill leaves it, no save carries it


def recover_checkpoint(folder: str):
    """Finish what a save interrupted by a crash left: FOLDER.old without FOLDER is the
    previous checkpoint, whole (renamed back); FOLDER.old beside FOLDER is a leftover
    (removed); FOLDER.tmp-* are unfinished writes (removed). Only folders a run of ours wrote
    (the marker; an unfinished write may also be empty) are touched."""
    folder = os.path.normpath(folder)
    old = folder + ".old"
    if is_ours(old) and not os.path.isdir(folder):
        os.rename(old, folder)
    elif is_ours(old) or _empty_dir(old):
        _remove_ours(old)
    parent, base = os.path.dirname(folder) or ".", os.path.basename(folder)
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            if name.startswith(base + ".tmp-") and (is_ours(path) or _empty_dir(path)):
                _remove_ours(path)


def _empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _remove_ours(path: str):
    """Remove a folder a run wrote, its marker last: a kill midway leaves it still marked as
    ours (or empty), so the next run finishes the job instead of taking it for a user's."""
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        if name == RUN_MARKER:
            continue
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry)
        else:
            os.remove(entry)
    if os.path.exists(os.path.join(path, RUN_MARKER)):
        os.remove(os.path.join(path, RUN_MARKER))
    os.rmdir(path)


def _marker(folder: str) -> Optional[dict]:
    path = os.path.join(folder, RUN_MARKER)
    return read_json(path) if os.path.isfile(path) else None


def check_out(folder: str, stage: str, **inputs):
    """Refuse, with one line, an output folder that a save of `stage` may not replace: a file,
    a user's non-empty folder (no marker), another stage's output, a user's FOLDER.old, or
    one of the run's inputs (or a folder holding one), which its first save would replace.
    inputs: {flag name: path or ""}. Scripts call it before any work; `fit` again."""
    folder = os.path.normpath(folder)
    out_real = os.path.realpath(folder)
    for name, path in inputs.items():
        real = os.path.realpath(path) if path else None
        if real is not None and (real == out_real or real.startswith(out_real + os.sep)):
            raise UserError(f"--out={folder} is also where --{name}={path} is read from; a run never writes "
                            "over its inputs: choose another --out")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out={folder}: is a file; give a folder")
    marker = _marker(folder) if os.path.isdir(folder) else None
    if os.path.isdir(folder) and os.listdir(folder) and marker is None:
        raise UserError(f"--out={folder}: exists and was not written by a llava-slt run (no {RUN_MARKER}); "
                        "nothing in it is replaced: choose another folder")
    if marker is not None and marker.get("stage") != stage:
        raise UserError(f"--out={folder}: holds the output of a {marker.get('stage')} run, this is {stage}; "
                        "choose another folder")
    old = folder + ".old"
    if os.path.exists(old) and not is_ours(old) and not _empty_dir(old):
        raise UserError(f"{old}: exists and was not written by a llava-slt run; a save renames {folder} "
                        "there for a moment: move it away")


def _publish_tree(folder: str, chmod: bool = True):
    """Modes from the umask (mkdtemp makes 0700, safetensors 0600: teammates could not read the
    checkpoint), and data on disk before the rename publishes it (a power cut stays safe)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        if chmod:
            os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            if chmod:
                os.chmod(path, 0o666 & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_json(path: str, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _write_train_state(path: str, state: dict):
    os.makedirs(path)
    opt = state["optimizer"]
    opt_tensors, opt_other = {}, {}
    for idx, entries in opt["state"].items():
        for k, v in entries.items():
            if torch.is_tensor(v):
                opt_tensors[f"state.{idx}.{k}"] = v
            else:
                opt_other[f"{idx}.{k}"] = v
    save_file(_cpu_tensors(opt_tensors), os.path.join(path, "optimizer.safetensors"))
    rng_tensors, rng_json = {}, []
    for r, s in enumerate(state["rng"]):
        rng_tensors[f"rank{r}.torch"] = s["torch"]
        if s.get("cuda") is not None:
            rng_tensors[f"rank{r}.cuda"] = s["cuda"]
        rng_json.append({"numpy": s["numpy"], "python": s["python"]})
    save_file(_cpu_tensors(rng_tensors), os.path.join(path, "rng.safetensors"))
    save_file(_cpu_tensors(state["trainable"]), os.path.join(path, "trainable.safetensors"))
    _write_json(os.path.join(path, "state.json"), {
        "format": FORMAT, "step": state["step"], "world_size": state["world_size"], "sampler": state["sampler"],
        "scaler": state.get("scaler"), "optimizer": {"param_groups": opt["param_groups"], "other_state": opt_other},
        "rng": rng_json, "extra": state.get("extra", {})})


def _cpu_tensors(tensors: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _read_train_state(path: str) -> dict:
    meta_path = os.path.join(path, "state.json")
    if not os.path.isfile(meta_path):
        raise MissingFileError(f"{meta_path}: missing; the checkpoint holds no resume state")
    meta = read_json(meta_path, "resume state")
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: format {meta.get('format')}, this code reads format {FORMAT}")
    state = {}
    for key, v in read_safetensors(os.path.join(path, "optimizer.safetensors")).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["optimizer"]["other_state"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["optimizer"]["param_groups"]]
    rng_tensors = read_safetensors(os.path.join(path, "rng.safetensors"))
    rng = [dict(s, torch=rng_tensors[f"rank{r}.torch"], cuda=rng_tensors.get(f"rank{r}.cuda"))
           for r, s in enumerate(meta["rng"])]
    return {"step": meta["step"], "world_size": meta["world_size"], "sampler": meta["sampler"],
            "scaler": meta["scaler"], "optimizer": {"state": state, "param_groups": groups}, "rng": rng,
            "trainable": read_safetensors(os.path.join(path, "trainable.safetensors")), "extra": meta["extra"],
            "path": path}


def _link_or_copy(src: str, dst: str):
    """A hard link (instant, whatever the size; the file survives the old folder's removal),
    or a copy where links are not possible (another filesystem, a symlink)."""
    try:
        if os.path.islink(src):
            raise OSError("a symlink is copied as a link")
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(src: str, dst: str):
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def save_checkpoint(folder: str, tensors: Optional[dict] = None, config: Optional[dict] = None,
                    train_state: Optional[dict] = None, write: Optional[Callable[[str], None]] = None,
                    stage: str = "train", state_only: bool = False):
    """Write a checkpoint folder atomically (see above).

    tensors -> model.safetensors; config -> config.json; write(tmp_folder) adds the script's
    own files (e.g. `model.save`, a Hugging Face folder), after config.json so it may replace
    it; train_state (from `capture_train_state`) -> train_state/. What the old folder holds
    beyond what the previous save wrote (metrics.jsonl, a user's notes, eval's predictions)
    is copied into the new one. state_only: only train_state/ is new, the old folder's
    weights and config stay (validation: the folder keeps the best weights, the resume state
    is the last step's). Call on one process only (rank 0).
    """
    folder = os.path.normpath(folder)
    parent = os.path.dirname(folder) or "."
    os.makedirs(parent, exist_ok=True)
    recover_checkpoint(folder)
    check_out(folder, stage)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
    try:
        _write_json(os.path.join(tmp, RUN_MARKER), {"stage": stage, "files": []})  # ours, even if cut short
        if tensors is not None:
            save_file(_cpu_tensors(tensors), os.path.join(tmp, "model.safetensors"))
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
        if write is not None:
            write(tmp)
        if train_state is not None:
            _write_train_state(os.path.join(tmp, TRAIN_STATE), train_state)
        written = sorted(set(os.listdir(tmp)) - {RUN_MARKER})
        previous = (_marker(folder) or {}).get("files", []) if os.path.isdir(folder) else []
        ours = set(written) | set(KEEP) | (set(previous) if state_only else set())
        _write_json(os.path.join(tmp, RUN_MARKER), {"stage": stage, "files": sorted(ours)})
        _publish_tree(tmp)  # what this save wrote; what is carried over below keeps its own modes
        carried = [name for name in (sorted(os.listdir(folder)) if os.path.isdir(folder) else [])
                   if name not in written and name != RUN_MARKER and not name.endswith(PARTIAL)
                   and (state_only or name in KEEP or name not in previous)]
        for name in carried:
            _carry(os.path.join(folder, name), os.path.join(tmp, name))
            if os.path.isdir(os.path.join(tmp, name)):
                _publish_tree(os.path.join(tmp, name), chmod=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder + ".old"
    if _empty_dir(old):
        os.rmdir(old)
    if os.path.exists(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    if os.path.exists(old):
        _remove_ours(old)


def load_checkpoint(folder: str) -> dict:
    """{"tensors": model.safetensors or None, "config": config.json or None,
    "train_state": train_state/ or None} of a folder written by `save_checkpoint`."""
    folder = checkpoint_folder(folder)
    if not os.path.isdir(folder):
        raise MissingFileError(f"{folder}: no such checkpoint folder")
    weights, config_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    ts = os.path.join(folder, TRAIN_STATE)
    return {"tensors": read_safetensors(weights) if os.path.isfile(weights) else None,
            "config": read_json(config_path) if os.path.isfile(config_path) else None,
            "train_state": _read_train_state(ts) if os.path.isdir(ts) else None}


def start_run(folder: str, stage: str, step: int):
    """Rank 0, as a run starts at `step`: a new or empty folder is marked as this run's (from
    the first metrics row on), and metrics rows past `step` (written after the checkpoint a
    resume starts from) are dropped."""
    if not os.path.isdir(folder) or not os.listdir(folder):
        os.makedirs(folder, exist_ok=True)
        _write_json(os.path.join(folder, RUN_MARKER), {"stage": stage, "files": list(KEEP)})
    path = os.path.join(folder, "metrics.jsonl")
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


# ----------------------------------------------------------------------------- run.json: how a run was made

REPO = os.path.dirname(os.path.abspath(__file__))   # the code that runs: git is asked here, not in the cwd
PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def git_state(folder: str = REPO) -> Optional[dict]:
    """{"commit", "dirty"} of the git checkout holding `folder` (dirty: tracked files differ
    from the commit, as `git describe --dirty` says); None without git, outside a repository
    or when git does not answer within a few seconds. Never an error: a run is not stopped
    for its record."""
    # GIT_OPTIONAL_LOCKS=0: `git status` may not take index.lock (a commit at the same moment would fail)
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{device.type} ({platform.machine() or 'unknown'})"


def run_info(config, stage: str, precision: str, devices: list) -> dict:
    """What run.json holds for one start of a run: the resolved config, the code (git), the
    versions, one device name per process, the batches and the precision. `precision`:
    bf16 | fp16 | fp32, as resolved (never "auto")."""
    world = len(devices)
    per_process, accum = config.batch_size, getattr(config, "grad_accum", 1)
    info = {"stage": stage, "config": dataclasses.asdict(config), "git": git_state(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "devices": devices, "world_size": world,
            "batch": {"per_process": per_process, "grad_accum": accum, "global": per_process * accum * world},
            "precision": precision}
    if stage == "vcp":
        # the CLIP loss contrasts each clip with every other sentence of the global batch: every
        # process's (losses.all_gather), every micro-batch of the window (train_vcp's GradCache)
        info["negatives"] = info["batch"]["global"] - 1
    return info


def _start(info: dict, step: int) -> dict:
    """One entry of run.json's "starts": this start of the run."""
    return {"step": step, "resumed": step > 0, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": info["git"], "world_size": info["world_size"], "argv": sys.argv}


def write_json_atomic(path: str, obj):
    """Whole or not at all: a reader never sees half a file (written beside it, then renamed)."""
    tmp = path + PARTIAL
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _previous_starts(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            starts = json.load(f).get("starts", [])
        return starts if isinstance(starts, list) else []
    except (OSError, ValueError, AttributeError):   # none yet, or not ours to read: the list starts anew
        return []


def record_run(folder: str, stage: str, config, dist, precision: str, step: int) -> Optional[dict]:
    """FOLDER/run.json as a run starts at `step` (> 0: resumed from the checkpoint of that step).
    Collective under DDP (every process's device name is gathered), so every rank calls it;
    rank 0 writes it, after `start_run`. A resume keeps the earlier starts in "starts"; the
    other fields are this start's. Every save carries the file (KEEP). Returns the record on
    rank 0, None elsewhere (git is asked once, not by every process)."""
    devices = [device_name(dist.device)]
    if dist.ddp:
        devices = [None] * dist.world_size
        torch_dist.all_gather_object(devices, device_name(dist.device))
    if not dist.is_main:
        return None
    info = run_info(config, stage, precision, devices)
    path = os.path.join(folder, RUN_INFO)
    info["starts"] = (_previous_starts(path) if step > 0 else []) + [_start(info, step)]
    write_json_atomic(path, info)
    return info


def record_eval(config, outputs: list, device, dtype: torch.dtype) -> list:
    """eval.py's record: `<output stem>.run.json` beside each file it wrote (predictions, --json),
    e.g. predictions_test.run.json; not run.json, since the default predictions go into the
    checkpoint's folder, whose run.json is the training run's. Returns the paths written."""
    info = run_info(config, "eval", PRECISION_OF_DTYPE[str(dtype).removeprefix("torch.")], [device_name(device)])
    info["starts"] = [_start(info, 0)]
    paths = sorted({os.path.splitext(path)[0] + ".run.json" for path in outputs if path})
    for path in paths:
        write_json_atomic(path, info)
    return paths


# ----------------------------------------------------------------------------- the resume state in memory

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


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def capture_train_state(step: int, optimizer, model, sampler_state: dict, dist, scaler=None,
                        extra: Optional[dict] = None) -> dict:
    """Everything a resume needs, in memory. Collective under DDP (every rank's RNG is gathered
    to all), so every rank calls it; only rank 0 then writes it. dist: cli.Dist."""
    rng = rng_state(dist.device)
    if dist.ddp:
        every = [None] * dist.world_size
        torch_dist.all_gather_object(every, {k: v.cpu() if torch.is_tensor(v) else v for k, v in rng.items()})
        rng = every
    else:
        rng = [rng]
    return {"step": step, "world_size": dist.world_size, "sampler": dict(sampler_state, world_size=dist.world_size),
            "scaler": scaler.state_dict() if scaler is not None else None, "optimizer": optimizer.state_dict(),
            "rng": rng, "trainable": {n: p.detach() for n, p in _trainable(model).items()},
            "extra": extra or {}}


def restore_train_state(state: dict, optimizer=None, model=None, sampler=None, scaler=None, dist=None) -> dict:
    """Put a `load_checkpoint(...)["train_state"]` back: the trainable weights into `model`,
    the optimizer, the GradScaler, this rank's RNG, the sampler's (epoch, position).
    Returns {"step", "epoch", "position"} (the position converted if the world size changed).
    dist: cli.Dist (default: one process on the CPU)."""
    rank, world_size, device = (dist.rank, dist.world_size, dist.device) if dist is not None else (0, 1, None)
    path = state.get("path", TRAIN_STATE)
    if model is not None:
        copy_strict(_trainable(model), state["trainable"], os.path.join(path, "trainable.safetensors"))
    if optimizer is not None:
        _load_optimizer(optimizer, state["optimizer"], os.path.join(path, "optimizer.safetensors"))
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank], device)
    else:   # more ranks than when saved: a fresh but deterministic stream for the new ones
        from training import seed_everything   # (training imports this file)
        seed_everything(1_000_003 * state["step"] + rank)
    epoch, position = state["sampler"]["epoch"], state["sampler"]["position"]
    saved_world = state["sampler"].get("world_size", world_size)
    if saved_world != world_size:     # the first position*saved_world samples of the epoch are done
        position = position * saved_world // world_size
    if sampler is not None:
        sampler.set_epoch(epoch, min(position, sampler.num_samples))
    return {"step": state["step"], "epoch": epoch, "position": position}


def resume_run(folder: str, optimizer, model, scaler, dist, batches) -> Optional[tuple]:
    """(step, best, bad_evals) of the run in `folder`, put back from its train_state/ (weights,
    optimizer, GradScaler, RNG, the position of `batches`, validation's best so far); None
    when there is none. dist: cli.Dist."""
    path = os.path.join(folder, TRAIN_STATE)
    if not os.path.isdir(path):
        dist.log(f"--resume: no checkpoint in {folder}, starting at step 0")
        return None
    state = _read_train_state(path)
    where = restore_train_state(state, optimizer, model, scaler=scaler, dist=dist)   # sets the RNG last
    batches.epoch, batches.position = where["epoch"], where["position"]
    dist.log(f"resumed from {path} at step {where['step']} (epoch {batches.epoch}, sample {batches.position})")
    return where["step"], state["extra"].get("best"), state["extra"].get("bad_evals", 0)


def _load_optimizer(optimizer, saved: dict, where: str):
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise UserError(f"{where}: {len(saved['param_groups'])} parameter groups, the optimizer has {len(groups)}")
    flat = [p for g in groups for p in g["params"]]
    for i, (sg, g) in enumerate(zip(saved["param_groups"], groups)):
        if len(sg["params"]) != len(g["params"]):
            raise UserError(f"{where}: group {i} holds {len(sg['params'])} parameters, "
                            f"the optimizer's {len(g['params'])}")
        if "param_names" in sg and "param_names" in g and sg["param_names"] != g["param_names"]:
            a, b = next((a, b) for a, b in zip(sg["param_names"], g["param_names"]) if a != b)
            raise UserError(f"{where}: group {i} has {a} where the optimizer has {b}")
    names = [n for g in groups for n in g.get("param_names", [None] * len(g["params"]))]
    for idx, entries in saved["state"].items():
        for k, v in entries.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape != flat[idx].shape:
                raise UserError(f"{where}: state.{idx}.{k} has shape {tuple(v.shape)}, "
                                f"parameter {idx} ({names[idx]}) has {tuple(flat[idx].shape)}")
    optimizer.load_state_dict(saved)
