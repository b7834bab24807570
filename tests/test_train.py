"""Tests for training.py (and what it uses off the reading path: cli.py, loader.py,
checkpoint.py): schedule, flags, optimizer groups, atomic checkpoints, exact resume,
DDP/accumulation equivalence (2 gloo processes under torchrun), time limit.

Run as a script (`torchrun ... tests/test_train.py --ddp-toy OUT`) this file is also the
toy training program of the 2-process test.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import Dataset, DistributedSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import loader  # noqa: E402
import training  # noqa: E402
from checkpoint import capture_train_state, load_checkpoint, restore_train_state, save_checkpoint  # noqa: E402
from cli import Dist, cli, parse_config, setup_distributed  # noqa: E402
from errors import CheckpointError, DataError, DivergedError, MissingFileError
from hf import RUN_MARKER, checkpoint_folder  # noqa: E402
from loader import ResumableSampler  # noqa: E402
from losses import all_gather  # noqa: E402
from training import TrainConfig, fit, lr_at, make_optimizer, seed_everything  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one thread


# ============================================================================ toy task
# A masked per-token regression: items have 1..6 supervised positions, so normalising by
# the token count of the whole window (not per micro-batch or per rank) matters.

class ToyData(Dataset):
    def __init__(self, n: int = 64, augment: bool = False):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, 4, generator=g)                                # (N, T, 4)
        self.y = (self.x @ torch.randn(4, generator=g)).tanh() + 0.1 * torch.randn(n, 6, generator=g)  # (N, T)
        self.lengths = torch.randint(1, 7, (n,), generator=g)
        self.augment, self.loads = augment, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loads += 1
        x = self.x[i]
        if self.augment:   # draws from the global RNG: an exact resume must restore it
            x = x + 0.05 * torch.randn_like(x)
        return {"x": x, "y": self.y[i], "mask": torch.arange(6) < self.lengths[i]}


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, logit_scale: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 1))
        if logit_scale:   # like CLIP's: a scalar that multiplies the whole global batch
            self.logit_scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return self.net(x).squeeze(-1)   # (B, T)


def sum_step(model, batch):
    err = (model(batch["x"]) - batch["y"]) ** 2 * batch["mask"]   # (B, T)
    return err.sum(), batch["mask"].sum()


def _world():
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def mean_step(model, batch):
    """A loss over the global batch (like CLIP: gathered rows, a scale every rank sees whole)
    plus a second term the way a fork adds one: a mean over this rank's items, simply added.
    The one rule (docs/training.md): nothing here knows the world size."""
    pred, m = model(batch["x"]), batch["mask"].float()             # (B, T)
    score = (pred * m).sum(1) / m.sum(1)                           # (B,)
    every = all_gather(score[:, None])[:, 0] if _world() > 1 else score   # (B * world,)
    scale = getattr(model, "module", model).logit_scale
    global_term = torch.logsumexp(scale * every, 0) - every.mean()
    local_mse = (((pred - batch["y"]) ** 2 * m).sum(1) / m.sum(1)).mean()
    return global_term + local_mse, None, {"mse": local_mse.detach()}


def run_toy(out, steps, batch_size, grad_accum=1, step_fn=sum_step, dropout=0.0, augment=False, dist=None, **kw):
    seed_everything(0)
    model, data = MLP(dropout, logit_scale=step_fn is mean_step), ToyData(augment=augment)
    config = TrainConfig(**{**dict(out=str(out), max_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                                   lr=3e-2, weight_decay=0.01, max_grad_norm=1.0, log_every=1, device="cpu"), **kw})
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    result = fit(model, step_fn, data, optimizer, config, dist)
    return result, model, data


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ============================================================================ schedule

@pytest.mark.parametrize("total, pct, div, final", [(100, 0.3, 25.0, 1e4), (7, 0.25, 10.0, 100.0),
                                                    (1000, 0.05, 25.0, 1e4), (37, 0.5, 4.0, 1e3), (1, 0.3, 25.0, 1e4)])
def test_lr_at_equals_onecycle_every_step(total, pct, div, final):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-4, total_steps=total, pct_start=pct,
                                                anneal_strategy="cos", div_factor=div, final_div_factor=final,
                                                three_phase=False)
    for step in range(total + 1):
        expected = sched.get_last_lr()[0]
        assert lr_at(step, total, 2e-4, pct, div, final) == pytest.approx(expected, rel=1e-12, abs=0)
        if step < total:
            opt.step()
            sched.step()
    assert lr_at(0, 100, 1e-3) == pytest.approx(1e-3 / 25)
    assert lr_at(99, 100, 1e-3) == pytest.approx(1e-3 / 25 / 1e4)    # the last step ends the cosine


# ============================================================================ flags

@dataclass
class StageConfig(TrainConfig):
    name: str = "x"
    limit: Optional[int] = 5


def test_parse_config_types():
    config = parse_config(StageConfig, ["--lr=1e-4", "--batch_size", "16", "--resume=yes", "--time_limit=30",
                                        "--max_steps=1e3", "--precision", "fp32", "--limit=none", "--name=",
                                        "--max-grad-norm=0"])
    assert (config.lr, config.batch_size, config.resume) == (1e-4, 16, True)
    assert (config.time_limit, config.max_steps, config.precision) == (30.0, 1000, "fp32")
    assert (config.limit, config.name, config.max_grad_norm) == (None, "", 0.0)
    assert isinstance(config.max_steps, int) and isinstance(config.time_limit, float)
    assert parse_config(StageConfig, []) == StageConfig()
    assert parse_config(StageConfig, ["--limit", "7"]).limit == 7


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("1", True), ("0", False),
                                         ("yes", True), ("no", False), ("True", True), ("NO", False)])
def test_parse_config_bools(text, value):
    assert parse_config(TrainConfig, [f"--resume={text}"]).resume is value
    assert parse_config(TrainConfig, ["--resume", text]).resume is value
    assert parse_config(TrainConfig, ["--resume", "--lr=2"]).resume is True      # a bare flag is true


@pytest.mark.parametrize("argv, message", [
    (["--lrr=1"], "unknown option --lrr; valid options: --out --epochs"),
    (["--lr=abc"], "--lr=abc: expected float"),
    (["--batch_size=2.5"], "--batch_size=2.5: expected int"),
    (["--resume=maybe"], "--resume=maybe: expected bool"),
    (["--lr"], "--lr needs a value (float)"),
    (["lr=1"], "unexpected argument 'lr=1'"),
    (["--precision=fp8"], "--precision=fp8: expected one of auto, bf16, fp16, fp32"),
    (["--grad_accum=0"], "--grad_accum=0: must be at least 1"),
])
def test_parse_config_errors(argv, message):
    with pytest.raises(ValueError) as e:
        parse_config(TrainConfig, argv)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
    if "unknown" in message:
        assert "--batch_size" in str(e.value) and "--device" in str(e.value)


def test_parse_config_errors_name_types_of_stage_fields():
    with pytest.raises(ValueError, match="--limit=x: expected int or none"):
        parse_config(StageConfig, ["--limit=x"])


def test_help_and_cli_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(StageConfig, ["--help"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "--lr" in printed and "float" in printed and "default 0.001" in printed

    def main(argv):
        parse_config(TrainConfig, argv)

    with pytest.raises(SystemExit) as e:
        cli(main, ["--lr=abc"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: --lr=abc: expected float\n"

    def missing(argv):
        raise CheckpointError("checkpoint x/model.safetensors: missing lm_head.weight")

    with pytest.raises(SystemExit):
        cli(missing, [])
    assert capsys.readouterr().err == "error: checkpoint x/model.safetensors: missing lm_head.weight\n"

    def bug(argv):  # a typo in a fork's train_step: a traceback, not one line
        return {"frames": 1}["frame"]

    with pytest.raises(KeyError, match="frame"):
        cli(bug, [])

    def wrong_shape(argv):  # a plain ValueError is a bug in the code too (torch's, or a fork's)
        torch.zeros(2, 3).view(4)

    with pytest.raises(RuntimeError):
        cli(wrong_shape, [])
    with pytest.raises(ValueError, match="not a user's"):
        cli(lambda argv: (_ for _ in ()).throw(ValueError("not a user's")), [])
    assert capsys.readouterr().err == ""

    for error in (DataError("data.jsonl row 3: no text"), MissingFileError("x.mp4: not found"),
                  DivergedError("20 non-finite steps in a row")):
        with pytest.raises(SystemExit):
            cli(lambda argv: (_ for _ in ()).throw(error), [])
        assert capsys.readouterr().err == f"error: {error}\n"


# ============================================================================ optimizer

class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.shared = nn.Embedding(10, 8)                              # embedding without "embed" in its name
        self.query = nn.Linear(8, 8)                                   # a projection called query: decays
        self.query_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 5, 8))
        self.logit_scale = nn.Parameter(torch.tensor(2.6))
        self.input_layernorm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_optimizer_groups_no_decay_on_norms_biases_embeddings():
    opt = make_optimizer(Tower(), lr=1e-3, weight_decay=0.1)
    groups = {g["weight_decay"]: set(g["param_names"]) for g in opt.param_groups}
    assert groups[0.1] == {"query.weight", "fc.weight"}
    assert groups[0.0] == {"embed_tokens.weight", "shared.weight", "query.bias", "query_token", "cls_token",
                           "position_embeddings", "logit_scale", "input_layernorm.weight", "input_layernorm.bias",
                           "fc.bias"}
    assert opt.defaults["betas"] == (0.9, 0.999)
    # a {name: param} dict (e.g. lora_parameters) works too; only what requires grad
    lora = {"q_proj.lora_A.weight": nn.Parameter(torch.zeros(2, 8)),
            "q_proj.lora_B.weight": nn.Parameter(torch.zeros(8, 2)),
            "model.norm.weight": nn.Parameter(torch.ones(8)), "x": nn.Parameter(torch.ones(8, 8), requires_grad=False)}
    opt = make_optimizer(lora, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert [set(g["param_names"]) for g in opt.param_groups] == [{"q_proj.lora_A.weight", "q_proj.lora_B.weight"},
                                                                  {"model.norm.weight"}]
    with pytest.raises(ValueError, match="no parameter requires grad"):
        make_optimizer(nn.Linear(2, 2).requires_grad_(False), 1e-3, 0.1)


# ============================================================================ sampler

@pytest.mark.parametrize("n, world", [(10, 1), (10, 2), (11, 3)])
def test_sampler_is_distributed_sampler_with_a_start(n, world):
    data = list(range(n))
    for rank in range(world):
        for epoch in (0, 3):
            ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
            ref.set_epoch(epoch)
            ours = ResumableSampler(data, world, rank, shuffle=True, seed=7)
            ours.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)
            ours.set_epoch(epoch, start_index=2)
            assert list(ours) == list(ref)[2:] and len(ours) == len(ref) - 2


# ============================================================================ checkpoints

def _train_state(step=3):
    seed_everything(1)
    model = MLP()
    opt = make_optimizer(model, 1e-2, 0.01)
    for _ in range(step):
        model(torch.randn(2, 6, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, capture_train_state(step, opt, model, {"epoch": 1, "position": 8}, Dist(),
                                           extra={"note": "x"})


def test_checkpoint_roundtrip_restores_weights_optimizer_rng_sampler(tmp_path):
    model, opt, state = _train_state()
    after = (torch.rand(3), np.random.rand(), random.random())     # what the RNGs give after the capture
    save_checkpoint(tmp_path / "ck", tensors=model.state_dict(), config={"a": 1}, train_state=state)
    assert sorted(os.listdir(tmp_path / "ck" / "train_state")) == ["optimizer.safetensors", "rng.safetensors",
                                                                   "state.json", "trainable.safetensors"]
    assert not any(n.endswith((".pt", ".pkl", ".bin")) for _, _, fs in os.walk(tmp_path) for n in fs)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck["config"] == {"a": 1} and set(ck["tensors"]) == set(model.state_dict())
    with open(tmp_path / "ck" / "train_state" / "state.json") as f:
        assert json.load(f)["optimizer"]["param_groups"][0]["param_names"] == ["net.0.weight", "net.4.weight"]

    seed_everything(99)
    fresh = MLP()
    fresh_opt = make_optimizer(fresh, 1e-2, 0.01)
    sampler = ResumableSampler(list(range(20)))
    where = restore_train_state(ck["train_state"], fresh_opt, fresh, sampler)
    assert where == {"step": 3, "epoch": 1, "position": 8} and (sampler.epoch, sampler.start_index) == (1, 8)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    ref, got = opt.state_dict(), fresh_opt.state_dict()
    assert ref["param_groups"] == got["param_groups"]
    for i in ref["state"]:
        for k in ref["state"][i]:
            assert torch.equal(ref["state"][i][k], got["state"][i][k]), (i, k)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(after[0], again[0]) and after[1:] == again[1:]

    # another world size: the epoch position is kept in global samples
    assert restore_train_state(ck["train_state"], dist=Dist(rank=1, world_size=2))["position"] == 4


def test_checkpoint_errors_name_file_and_key(tmp_path):
    _, _, state = _train_state()
    save_checkpoint(tmp_path / "ck", train_state=state)
    ts = load_checkpoint(tmp_path / "ck")["train_state"]
    other = nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 1))
    with pytest.raises(KeyError, match=r"train_state/trainable.safetensors: missing 0.bias"):
        restore_train_state(ts, model=other)
    wide = MLP()
    wide.net[0] = nn.Linear(4, 16)
    with pytest.raises(ValueError, match=r"optimizer.safetensors: state.0.exp_avg has shape \(32, 4\), "
                                         r"parameter 0 \(net.0.weight\) has \(16, 4\)"):
        restore_train_state(ts, optimizer=make_optimizer(wide, 1e-3, 0.01))
    os.remove(tmp_path / "ck" / "train_state" / "optimizer.safetensors")
    with pytest.raises(FileNotFoundError, match="optimizer.safetensors: not found"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="was not written by a llava-slt run .* nothing in it is replaced"):
        save_checkpoint(tmp_path / "mine", tensors={"w": torch.zeros(1)})
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


@pytest.mark.parametrize("crash", ["while_writing", "between_renames", "before_cleanup"])
def test_crash_during_save_leaves_a_whole_checkpoint(tmp_path, monkeypatch, crash):
    folder = tmp_path / "ck"
    _, _, state = _train_state(step=3)
    save_checkpoint(folder, tensors={"w": torch.ones(1000)}, config={"v": 1}, train_state=state)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    _, _, state2 = _train_state(step=5)

    def boom(*args, **kwargs):
        raise OSError("simulated crash")

    write = None
    if crash == "while_writing":
        def write(d):
            (tmp_path / "partial").write_text(d)
            boom()
    elif crash == "between_renames":       # old folder moved aside, new one not yet in place
        real, calls = os.rename, []

        def flaky(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                boom()
            real(src, dst)
        monkeypatch.setattr(checkpoint.os, "rename", flaky)
    else:
        monkeypatch.setattr(checkpoint.shutil, "rmtree", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(folder, tensors={"w": torch.full((1000,), 2.0)}, config={"v": 2}, train_state=state2,
                        write=write)
    monkeypatch.undo()
    if crash == "between_renames":
        assert not folder.exists() and (tmp_path / "ck.old").is_dir()

    v = 2 if crash == "before_cleanup" else 1     # the new one was complete and in place there
    for recovered in (False, True):                # readers read ck.old as it is; training renames it back
        if recovered:
            checkpoint.recover_checkpoint(folder)
            assert sorted(os.listdir(tmp_path)) == ["ck"] + (["partial"] if crash == "while_writing" else [])
        ck = load_checkpoint(folder)
        assert ck["config"] == {"v": v} and torch.equal(ck["tensors"]["w"], torch.full((1000,), float(v)))
        assert ck["train_state"]["step"] == (5 if v == 2 else 3)
        where = checkpoint_folder(folder)
        assert open(os.path.join(where, "metrics.jsonl")).read() == '{"step": 1}\n'   # carried into the new folder


_SAVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
import checkpoint, training
model = torch.nn.Linear(64, 64)
opt = training.make_optimizer(model, 1e-3, 0.0)
model(torch.randn(2, 64)).sum().backward(); opt.step()
i = int(sys.argv[2])
while True:
    i += 1
    state = checkpoint.capture_train_state(i, opt, model, {"epoch": 0, "position": i}, training.Dist())
    w = torch.full((500_000,), float(i))
    checkpoint.save_checkpoint(sys.argv[1], tensors={"w": w}, config={"v": i}, train_state=state,
                               write=lambda d: open(d + "/extra.txt", "w").write(str(i)))
    print(i, flush=True)
"""


def test_kill_at_a_random_moment_leaves_a_whole_checkpoint(tmp_path):
    folder, version, rng = tmp_path / "ck", 0, random.Random(0)
    for _ in range(1):     # each round costs a torch import (~3 s of CPU): one
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder), str(version), ROOT],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        seen = [int(proc.stdout.readline()) for _ in range(3)]
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        proc.wait()
        ck = load_checkpoint(folder)
        version = ck["config"]["v"]
        assert version >= seen[-1]
        assert torch.equal(ck["tensors"]["w"], torch.full((500_000,), float(version)))
        assert open(os.path.join(checkpoint_folder(folder), "extra.txt")).read() == str(version)
        assert ck["train_state"]["step"] == version and ck["train_state"]["sampler"]["position"] == version
        checkpoint.recover_checkpoint(folder)
        assert sorted(os.listdir(tmp_path)) == ["ck"]
        assert (folder / "extra.txt").read_text() == str(version)


# ============================================================================ fit

def test_resume_continues_bit_for_bit(tmp_path):
    # 64 items, batch 4 x accumulation 2: 8 steps an epoch; 12 steps cross an epoch boundary.
    # Shuffling, dropout and augmentation noise all draw random numbers.
    opts = dict(steps=12, batch_size=4, grad_accum=2, dropout=0.2, augment=True, save_every=5)
    whole, model_whole, _ = run_toy(tmp_path / "whole", **opts)

    calls = []

    def crashing(model, batch):             # dies in the first micro-batch of step 8
        calls.append(1)
        if len(calls) > 14:
            raise RuntimeError("killed")
        return sum_step(model, batch)

    with pytest.raises(RuntimeError, match="killed"):
        run_toy(tmp_path / "cut", step_fn=crashing, **opts)
    assert json.loads((tmp_path / "cut" / "train_state" / "state.json").read_text())["step"] == 5
    resumed, model_resumed, data = run_toy(tmp_path / "cut", resume=True, **opts)

    assert data.loads == 7 * 2 * 4          # the 40 samples of epoch 0 before the checkpoint are not loaded
    assert resumed["step"] == 12 and len(resumed["losses"]) == 7
    assert resumed["losses"] == whole["losses"][5:]
    rows = metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == list(range(1, 13))      # rows past the checkpoint were dropped
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics(tmp_path / "whole")]
    for (name, a), b in zip(model_whole.state_dict().items(), model_resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(tmp_path / "cut")["train_state"]["step"] == 12


def test_accumulation_equals_the_large_batch(tmp_path):
    big, model_big, _ = run_toy(tmp_path / "big", steps=6, batch_size=4)
    acc, model_acc, _ = run_toy(tmp_path / "acc", steps=6, batch_size=2, grad_accum=2)
    np.testing.assert_allclose(acc["losses"], big["losses"], rtol=1e-6)
    for a, b in zip(model_big.parameters(), model_acc.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the test can tell: a per-micro-batch mean instead of the window's token count differs
    per_micro = lambda m, b: (sum_step(m, b)[0] / sum_step(m, b)[1], None)     # noqa: E731
    wrong, _, _ = run_toy(tmp_path / "wrong", steps=6, batch_size=2, grad_accum=2, step_fn=per_micro)
    assert abs(wrong["losses"][-1] - big["losses"][-1]) > 1e-4


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--ddp-toy", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    refs = {"sum": run_toy(tmp_path / "ref_sum", steps=6, batch_size=4)[1],
            "mean": run_toy(tmp_path / "ref_mean", steps=6, batch_size=4, step_fn=mean_step)[1]}
    for name, kind in [("ddp_b2", "sum"), ("ddp_b1_acc2", "sum"), ("ddp_mean", "mean")]:
        tensors = load_checkpoint(tmp_path / name)["tensors"]
        for key, ref in refs[kind].state_dict().items():
            torch.testing.assert_close(tensors[key], ref, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        # the logged loss is the global one for token sums; for the mixed loss its exact part is the log
        key = "loss" if kind == "sum" else "mse"
        np.testing.assert_allclose([r[key] for r in metrics(tmp_path / name)],
                                   [r[key] for r in metrics(tmp_path / f"ref_{kind}")], rtol=1e-6)
        # run.json (rank 0's) names both processes and the global batch
        info = json.loads((tmp_path / name / "run.json").read_text())
        per_process, accum = (1, 2) if name == "ddp_b1_acc2" else (2, 1)
        assert info["world_size"] == 2 and len(info["devices"]) == 2 and info["precision"] == "fp32"
        assert info["batch"] == {"per_process": per_process, "grad_accum": accum, "global": 4}
        assert [(s["step"], s["world_size"]) for s in info["starts"]] == [(0, 2)]


def _ddp_toy_main(out):
    dist = setup_distributed("cpu")
    assert dist.world_size == 2 and torch_dist.get_backend() == "gloo"
    run_toy(os.path.join(out, "ddp_b2"), steps=6, batch_size=2, dist=dist)
    run_toy(os.path.join(out, "ddp_b1_acc2"), steps=6, batch_size=1, grad_accum=2, dist=dist)
    run_toy(os.path.join(out, "ddp_mean"), steps=6, batch_size=2, step_fn=mean_step, dist=dist)
    torch_dist.destroy_process_group()


def test_time_limit_stops_saves_and_resumes(tmp_path):
    result, _, _ = run_toy(tmp_path / "t", steps=6, batch_size=4, time_limit=1e-9)
    assert result["stopped"] == "time_limit" and result["step"] == 1
    assert load_checkpoint(tmp_path / "t")["train_state"]["step"] == 1
    result, _, _ = run_toy(tmp_path / "t", steps=6, batch_size=4, resume=True)
    assert result["stopped"] == "done" and result["step"] == 6 and len(result["losses"]) == 5
    assert [r["step"] for r in metrics(tmp_path / "t")] == list(range(1, 7))
    row = metrics(tmp_path / "t")[-1]
    assert row["lr"] == lr_at(5, 6, 3e-2) and row["items_per_s"] > 0 and row["grad_norm"] > 0


def test_fit_refuses_an_out_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="was not written by a llava-slt run .* choose another folder"):
        run_toy(tmp_path, steps=1, batch_size=4)
    assert os.listdir(tmp_path) == ["notes.txt"]


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-toy"]:
    _ddp_toy_main(sys.argv[2])


# ============================================================================ nothing a user owns is lost

def test_save_replaces_only_what_a_run_wrote(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, tensors={"w": torch.zeros(3)}, stage="vcp", write=lambda d: open(d + "/old.txt", "w").write("1"))
    marker = json.loads((ck / RUN_MARKER).read_text())
    assert marker == {"stage": "vcp", "files": ["metrics.jsonl", "model.safetensors", "old.txt", "run.json"]}
    (ck / "notes.txt").write_text("mine")                       # a user's note and folder put into our output
    os.chmod(ck / "notes.txt", 0o600)
    (ck / "mine").mkdir()
    (ck / "mine" / "a.txt").write_text("a")
    (ck / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "ck.tmp-mine").mkdir()                          # a user's folders that look like ours
    (tmp_path / "ck.tmp-mine" / "x").write_text("x")
    save_checkpoint(ck, tensors={"w": torch.ones(3)}, stage="vcp")
    assert sorted(os.listdir(ck)) == ["llava_slt_run.json", "metrics.jsonl", "mine", "model.safetensors", "notes.txt"]
    assert (ck / "notes.txt").read_text() == "mine" and (ck / "mine" / "a.txt").read_text() == "a"
    assert os.stat(ck / "notes.txt").st_mode & 0o777 == 0o600   # as the user left it
    assert (ck / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "ck.tmp-mine" / "x").read_text() == "x"   # not ours: never removed
    with pytest.raises(ValueError, match=r"holds the output of a vcp run, this is vlt; choose another folder"):
        save_checkpoint(ck, tensors={"w": torch.ones(3)}, stage="vlt")
    # a downloaded model folder (weights, a card, notes) is the user's: refused, untouched
    hub = tmp_path / "Qwen"
    hub.mkdir()
    for name in ("model.safetensors", "README.md", "tokenizer.json", "notes.txt"):
        (hub / name).write_text(name)
    (hub / "metrics.jsonl").write_text("{}")
    with pytest.raises(ValueError, match=r"Qwen: exists and was not written by a llava-slt run"):
        save_checkpoint(hub, tensors={"w": torch.ones(3)})
    with pytest.raises(ValueError, match=r"was not written by a llava-slt run"):
        run_toy(hub, steps=1, batch_size=4)
    assert sorted(os.listdir(hub)) == ["README.md", "metrics.jsonl", "model.safetensors", "notes.txt", "tokenizer.json"]
    # a user's FOLDER.old is never taken for a half-finished save, nor overwritten by one
    (tmp_path / "ck.old").mkdir()
    (tmp_path / "ck.old" / "keep.txt").write_text("k")
    checkpoint.recover_checkpoint(ck)
    with pytest.raises(ValueError, match=r"ck.old: exists and was not written by a llava-slt run; .* move it away"):
        save_checkpoint(ck, tensors={"w": torch.ones(3)}, stage="vcp")
    assert (tmp_path / "ck.old" / "keep.txt").read_text() == "k"
    shutil.rmtree(tmp_path / "ck")
    assert checkpoint_folder(str(ck)) == str(ck)         # the user's .old is not read as ours either


def test_outputs_that_are_inputs_are_refused(tmp_path):
    (tmp_path / "llm").mkdir()
    with pytest.raises(ValueError, match=r"--out=.*llm is also where --text_from_llm=.*llm is read from"):
        checkpoint.check_out(str(tmp_path / "llm"), "vcp", data="d", text_from_llm=str(tmp_path / "llm" / "."))
    with pytest.raises(ValueError, match=r"is also where --data="):          # an input inside the output
        checkpoint.check_out(str(tmp_path), "vcp", data=str(tmp_path / "llm"))
    checkpoint.check_out(str(tmp_path / "out"), "vcp", data=str(tmp_path / "llm"), init="")


def test_checkpoints_are_readable_by_the_group_as_the_umask_says(tmp_path):
    old = os.umask(0o022)
    try:
        _, _, state = _train_state()
        save_checkpoint(tmp_path / "ck", tensors={"w": torch.zeros(2)}, train_state=state)
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(tmp_path / "ck"):
        assert os.stat(root).st_mode & 0o777 == 0o755, root
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name


def _poisoned(model, bad_calls, where="loss"):
    """sum_step whose loss (or, with a finite loss, the gradient) is not finite at the given calls."""
    calls, poison = [0], [False]

    def hook(g):  # fires in the backward of a poisoned call only
        if poison[0]:
            poison[0] = False
            return torch.full_like(g, float("inf"))
        return g
    model.net[0].weight.register_hook(hook)

    def step(net, batch):
        loss, n = sum_step(net, batch)
        i, calls[0] = calls[0], calls[0] + 1
        if i in bad_calls:
            if where == "loss":
                loss = loss * float("nan")
            else:
                poison[0] = True
        return loss, n
    return step


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_never_applied_or_saved(tmp_path, where):
    config = TrainConfig(out=str(tmp_path / "t"), max_steps=6, batch_size=4, lr=3e-2, log_every=1, device="cpu")
    seed_everything(0)
    model = MLP()
    result = fit(model, _poisoned(model, {1, 2}, where), ToyData(), make_optimizer(model, config.lr, 0.0), config)
    assert result["step"] == 6 and result["skipped"] == 2
    rows = metrics(tmp_path / "t")
    assert [r["skipped"] for r in rows] == [0, 1, 2, 2, 2, 2]
    saved = load_checkpoint(tmp_path / "t")["tensors"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    # the skipped steps changed nothing: the same as a run that never saw those batches' updates
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "t"

    def main(argv):
        config = TrainConfig(out=str(out), max_steps=10, batch_size=4, lr=3e-2, log_every=1, device="cpu",
                             save_every=2, max_nonfinite_steps=3)
        seed_everything(0)
        model = MLP()
        fit(model, _poisoned(model, set(range(3, 100))), ToyData(), make_optimizer(model, config.lr, 0.0), config)

    with pytest.raises(SystemExit) as e:
        cli(main, [])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 3 steps in a row with a non-finite loss or gradient "
                                               "(at step 6); stopped without saving, the last checkpoint")
    assert "is from step 4" in err[0]   # saved at step 4 (skipped, so the weights of step 3)
    ck = load_checkpoint(out)
    assert ck["train_state"]["step"] == 4 and all(torch.isfinite(v).all() for v in ck["tensors"].values())


def test_saves_every_so_many_minutes(tmp_path):
    calls = []
    for minutes, expected in ((0.0, 1), (1e-9, 4)):
        calls.clear()
        config = TrainConfig(out=str(tmp_path / f"t{minutes}"), max_steps=4, batch_size=4, log_every=1, device="cpu",
                             save_every_minutes=minutes)
        seed_everything(0)
        model = MLP()
        fit(model, sum_step, ToyData(), make_optimizer(model, 1e-3, 0.0), config,
            save_fn=lambda d: calls.append(load_marker_free(d)))
        assert len(calls) == expected, minutes
    assert TrainConfig().save_every_minutes == 30.0      # a crash loses at most half an hour by default


def load_marker_free(folder):
    return sorted(n for n in os.listdir(folder) if n != RUN_MARKER)


# ============================================================================ fp32 master weights under bf16

class _VLTToy(nn.Module):
    """What VLT trains, in small: a connector into a frozen LLM with LoRA adapters."""

    def __init__(self, dtype, old_behaviour=False):
        super().__init__()
        from model import LLM, LLMConfig, Connector, apply_lora
        seed_everything(0)
        self.llm = LLM(LLMConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
        self.connector = Connector(16, 64)
        self.llm.to(dtype).requires_grad_(False)
        apply_lora(self.llm, ("q_proj", "v_proj"), r=4, alpha=8)
        if old_behaviour:  # before: the connector built in the LLM's dtype, adapters in the base weight's
            self.connector.to(dtype)
            for n, p in self.llm.named_parameters():
                if ".lora_" in n:
                    p.data = p.data.to(dtype)

    def forward(self, feats):
        embeds = self.connector(feats).to(self.llm.model.embed_tokens.weight.dtype)  # (B, N, D)
        return self.llm(inputs_embeds=embeds)


class _FeatureData(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(64, 8, 16, generator=g), torch.randint(0, 64, (64, 8), generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _train_vlt_toy(tmp_path, name, dtype, precision, steps, old_behaviour=False):
    from losses import lm_loss
    model = _VLTToy(dtype, old_behaviour)
    model.connector.requires_grad_(True)
    if not old_behaviour:
        training.trainable_in_fp32(model)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(out=str(tmp_path / name), max_steps=steps, batch_size=8, lr=1e-5, pct_start=0.01,
                         div_factor=1.0, final_div_factor=1.0, precision=precision, log_every=100, device="cpu")

    def step(net, batch):
        loss, n = lm_loss(net(batch["x"]), batch["y"])
        return loss * n, n
    fit(model, step, _FeatureData(), make_optimizer(model, config.lr, 0.0), config)
    return {n: p.detach().float() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_trainable_weights_are_fp32_under_bf16_and_learn_at_lr_1e_5(tmp_path):
    ref = _train_vlt_toy(tmp_path, "fp32", torch.float32, "fp32", 20)
    got = _train_vlt_toy(tmp_path, "bf16", torch.bfloat16, "bf16", 20)
    assert sorted(got) == sorted(ref) and any(".lora_A." in n for n in got) and "connector.proj.0.weight" in got
    # tolerance 10% (norm of the difference / norm of the fp32 run's update), measured 0.6-6.5%
    # (the bf16 compute); with the old behaviour (trainable weights in bf16) 97-100% off, since
    # 95-100% of the connector and LoRA A entries never change at all
    old = _train_vlt_toy(tmp_path, "old", torch.bfloat16, "bf16", 20, old_behaviour=True)
    for n in got:
        rel, rel_old = (((d[n] - ref[n]).norm() / ref[n].norm()).item() for d in (got, old))
        assert (got[n] != 0).float().mean() > 0.99 and rel < 0.1, (n, rel)
        if "lora_B" not in n:  # B starts at zero, where bf16 resolves small steps too
            assert (old[n] != 0).float().mean() < 0.1 and rel_old > 0.9, (n, rel_old)


# ============================================================================ validation

def _scripted_eval(model, values, snapshots, crash_at=None):
    """evaluate() whose dev metric follows `values`; keeps a copy of the weights at each call."""
    calls = [0]

    def evaluate(m):
        i, calls[0] = calls[0], calls[0] + 1
        if i == crash_at:
            raise RuntimeError("simulated crash")
        snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"dev_score": values[i], "dev_other": -values[i]}
    return evaluate


def _fit_validated(out, values, snapshots, crash_at=None, **kw):
    config = TrainConfig(**{**dict(out=str(out), max_steps=len(values), batch_size=4, lr=3e-2, log_every=1,
                                   device="cpu", eval_every=1), **kw})
    seed_everything(0)
    model = MLP()
    return fit(model, sum_step, ToyData(), make_optimizer(model, config.lr, 0.0), config,
               evaluate=_scripted_eval(model, values, snapshots, crash_at), metric="dev_score")


def test_validation_keeps_the_best_weights_and_patience_stops(tmp_path):
    snaps = []
    result = _fit_validated(tmp_path / "p", [1.0, 3.0, 2.0, 2.5, 2.9, 9.9, 9.9], snaps, patience=3)
    assert result["stopped"] == "patience" and result["step"] == 5 and result["best"] == {"step": 2, "value": 3.0}
    ck = load_checkpoint(tmp_path / "p")
    for k, v in ck["tensors"].items():                 # the folder's weights: those of step 2
        assert torch.equal(v, snaps[1][k]), k
    assert ck["train_state"]["step"] == 5                # the resume state: the last step's
    assert ck["train_state"]["extra"]["best"] == {"step": 2, "value": 3.0}
    dev = [r for r in metrics(tmp_path / "p") if "dev_score" in r]
    assert [(r["step"], r["dev_score"], r["best_step"]) for r in dev] == [(1, 1.0, 1), (2, 3.0, 2), (3, 2.0, 2),
                                                                         (4, 2.5, 2), (5, 2.9, 2)]
    # lower is better (a loss): the best is the smallest
    config = TrainConfig(out=str(tmp_path / "l2"), max_steps=3, batch_size=4, log_every=1, device="cpu", eval_every=1)
    model = MLP()
    r = fit(model, sum_step, ToyData(), make_optimizer(model, 1e-3, 0.0), config, higher_is_better=False,
            evaluate=_scripted_eval(model, [3.0, 1.0, 2.0], []), metric="dev_score")
    assert r["best"] == {"step": 2, "value": 1.0} and r["stopped"] == "done"


def test_resume_keeps_the_best_so_far(tmp_path):
    values = [1.0, 3.0, 2.0, 2.5, 2.9, 2.8]
    whole_snaps = []
    whole = _fit_validated(tmp_path / "whole", values, whole_snaps, save_every=1)
    with pytest.raises(RuntimeError, match="simulated crash"):        # dies in the 5th validation
        _fit_validated(tmp_path / "cut", values, [], crash_at=4, save_every=1)
    assert load_checkpoint(tmp_path / "cut")["train_state"]["step"] == 4
    snaps = [None] * 4
    resumed = _fit_validated(tmp_path / "cut", values[4:] * 2, snaps, save_every=1, resume=True,
                             max_steps=len(values))
    assert resumed["best"] == whole["best"] == {"step": 2, "value": 3.0} and resumed["step"] == 6
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k        # the best: step 2's weights
    assert torch.equal(snaps[-1]["net.0.weight"], whole_snaps[-1]["net.0.weight"])  # and the run continued exactly


def test_loader_workers_feed_a_gpu_and_stay_out_of_the_way_on_a_cpu(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader.loader_workers(-1, "cuda") == 7            # 64 cores / 8 processes, one kept for training
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader.loader_workers(-1, "cuda:0") == 8          # at most 8
    assert loader.loader_workers(-1, "cpu") == 0 and loader.loader_workers(3, "cpu") == 3
    assert loader.loader_workers(-1, "cuda", in_memory=True) == 0
    assert TrainConfig().num_workers == -1
    with pytest.raises(ValueError, match="--num_workers=-2"):
        TrainConfig(num_workers=-2)


def test_a_kill_while_removing_the_old_folder_is_finished_later(tmp_path, monkeypatch):
    """The old checkpoint is removed with its marker last, so a kill midway leaves it marked as
    ours: the next save removes it, instead of refusing it as a user's FOLDER.old."""
    ck = tmp_path / "ck"
    _, _, state = _train_state()
    save_checkpoint(ck, tensors={"w": torch.zeros(2)}, train_state=state, config={"v": 1})
    real, calls = os.remove, []

    def dies_after_two(path):
        calls.append(path)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        real(path)
    monkeypatch.setattr(checkpoint.os, "remove", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, tensors={"w": torch.ones(2)}, train_state=state, config={"v": 2})
    monkeypatch.undo()
    assert (tmp_path / "ck.old" / RUN_MARKER).is_file() and len(os.listdir(tmp_path / "ck.old")) < 5
    assert load_checkpoint(ck)["config"] == {"v": 2}
    save_checkpoint(ck, tensors={"w": torch.ones(2)}, train_state=state, config={"v": 3})
    assert sorted(os.listdir(tmp_path)) == ["ck"] and load_checkpoint(ck)["config"] == {"v": 3}


class _EpochData(ToyData):
    """Draws per (epoch, index), like ClipDataset; says which process made each item."""

    def __init__(self):
        super().__init__(n=32)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        item = super().__getitem__(i)
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        item["x"] = item["x"] + 0.1 * torch.randn(item["x"].shape, generator=g)
        return {**item, "pid": torch.tensor(os.getpid()), "epoch": torch.tensor(self.epoch)}


def test_persistent_workers_draw_each_epochs_randomness(tmp_path):
    seen = {}
    for workers in (0, 2):
        pids, epochs = set(), []

        def step(model, batch):
            pids.update(batch["pid"].tolist())
            epochs.append(int(batch["epoch"][0]))
            return sum_step(model, batch)
        config = TrainConfig(out=str(tmp_path / f"w{workers}"), max_steps=12, batch_size=8, lr=3e-2, log_every=1,
                             device="cpu", num_workers=workers)
        seed_everything(0)
        model = MLP()
        seen[workers] = (fit(model, step, _EpochData(), make_optimizer(model, config.lr, 0.0), config)["losses"], pids,
                         epochs)
    assert seen[2][0] == seen[0][0]                     # the same batches, bit for bit
    assert seen[2][2] == seen[0][2] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(seen[2][1]) == 2 and os.getpid() not in seen[2][1]   # two workers, the same ones every epoch


def test_parameter_counts_say_what_trains():
    from model import apply_lora
    from training import parameter_counts
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))   # 15 and 8 parameters
    net[0].requires_grad_(False)
    assert parameter_counts(net, {"first": "0.", "second": "1."}) == \
        "parameters, trainable / frozen: first 0M / 1.5e-05M, second 8e-06M / 0M"
    apply_lora(net, targets=("0",), r=2, alpha=4)               # A (2x4) and B (3x2): 14 trainable
    line = parameter_counts(net, {"first": "0."})
    assert line == "parameters, trainable / frozen: first 0M / 1.5e-05M, first LoRA 1.4e-05M / 0M, other 8e-06M / 0M"
