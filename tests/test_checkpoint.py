"""Tests for how a run says how it was made (checkpoint.py's run.json, tracking.py's --wandb):
the record of a tiny run (config, commit, versions, batches, precision, every start), that it
survives saves and resumes, eval's record beside its outputs, and the wandb rows, read back
from an offline run's own file. The 2-process record is checked in tests/test_train.py's DDP
test (its folders hold run.json too); the scripts' records in tests/test_scripts.py.
"""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checkpoint  # noqa: E402
import tracking  # noqa: E402
from checkpoint import RUN_INFO, git_state, record_eval, run_info  # noqa: E402
from cli import cli, parse_config  # noqa: E402
from errors import UserError  # noqa: E402
from eval import EvalConfig  # noqa: E402
from test_train import MLP, ToyData, metrics, run_toy, sum_step  # noqa: E402
from training import TrainConfig, fit, make_optimizer, seed_everything  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE_GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True}


def read_run(folder):
    return json.loads((folder / RUN_INFO).read_text())


def git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_reads_the_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "a")
    head = git(repo, "rev-parse", "HEAD")
    assert len(head) == 40 and git_state(str(repo)) == {"commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked")          # not part of the code: still clean
    assert git_state(str(repo)) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(str(repo)) == {"commit": head, "dirty": True}
    assert not os.path.exists(repo / ".git" / "index.lock")
    (tmp_path / "plain").mkdir()                           # no repository: null, never an error
    assert git_state(str(tmp_path / "plain")) is None
    monkeypatch.setenv("PATH", str(tmp_path / "plain"))    # no git at all
    assert git_state(str(repo)) is None
    # the repository asked is the code's folder, whatever the working directory
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path / "plain")
    asked = []
    monkeypatch.setattr(checkpoint.subprocess, "run", lambda cmd, cwd, **kw: asked.append(cwd) or
                        subprocess.CompletedProcess(cmd, 0, stdout="abc\n" if "rev-parse" in cmd else ""))
    assert git_state() == {"commit": "abc", "dirty": False} and asked == [ROOT, ROOT] == [checkpoint.REPO] * 2


def test_run_json_of_a_tiny_run_says_how_it_was_made_and_survives_saves_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "git_state", lambda folder=None: dict(FAKE_GIT))
    out = tmp_path / "t"
    run_toy(out, steps=6, batch_size=4, grad_accum=2, time_limit=1e-9)        # stops (and saves) at step 1
    info = read_run(out)
    assert info["stage"] == "train" and info["git"] == FAKE_GIT and info["world_size"] == 1
    assert info["batch"] == {"per_process": 4, "grad_accum": 2, "global": 8}
    assert info["precision"] == "fp32" and info["config"]["precision"] == "auto"    # resolved, and as given
    assert info["config"]["out"] == str(out) and info["config"]["max_steps"] == 6
    assert info["devices"] == [checkpoint.device_name("cpu")] and info["devices"][0].startswith("cpu")
    assert info["python"] == ".".join(map(str, sys.version_info[:3])) and info["torch"] == torch.__version__
    assert info["cuda"] == torch.version.cuda and "negatives" not in info
    assert [(s["step"], s["resumed"]) for s in info["starts"]] == [(0, False)]
    assert "run.json" in json.loads((out / "llava_slt_run.json").read_text())["files"]
    # resumed with another accumulation, saving every step: one more start, this start's batch
    run_toy(out, steps=6, batch_size=4, grad_accum=1, resume=True, save_every=1)
    info = read_run(out)
    assert [(s["step"], s["resumed"], s["world_size"]) for s in info["starts"]] == [(0, False, 1), (1, True, 1)]
    assert info["batch"]["global"] == 4 and info["config"]["resume"] is True
    assert all(s["git"] == FAKE_GIT and s["time"].endswith("Z") for s in info["starts"])
    assert sorted(os.listdir(out)) == ["config.json", "llava_slt_run.json", "metrics.jsonl", "model.safetensors",
                                       "run.json", "train_state"]
    # a new run into the same folder (no --resume) is a new record
    run_toy(out, steps=2, batch_size=4)
    assert [(s["step"], s["resumed"]) for s in read_run(out)["starts"]] == [(0, False)]


def test_a_run_json_write_cut_short_is_not_carried_by_saves(tmp_path):
    """A kill while run.json (or eval's record beside its predictions) is written leaves the
    unfinished file; a save keeps a user's files, not that."""
    out = tmp_path / "ck"
    checkpoint.save_checkpoint(str(out), config={"a": 1})
    (out / ("run.json" + checkpoint.PARTIAL)).write_text('{"stage": "tr')
    (out / ("predictions_test.run.json" + checkpoint.PARTIAL)).write_text('{"stage": "ev')
    (out / "notes.txt").write_text("mine")
    checkpoint.save_checkpoint(str(out), config={"a": 2})
    assert sorted(os.listdir(out)) == ["config.json", "llava_slt_run.json", "notes.txt"]


def test_vcp_records_its_negatives_and_a_world_of_processes():
    config = TrainConfig(batch_size=16, grad_accum=2)
    info = run_info(config, "vcp", "bf16", ["NVIDIA H100 (cuda:0)", "NVIDIA H100 (cuda:1)"])
    assert info["world_size"] == 2 and info["batch"] == {"per_process": 16, "grad_accum": 2, "global": 64}
    assert info["negatives"] == 63 and info["precision"] == "bf16"
    assert "negatives" not in run_info(config, "vlt", "bf16", ["cpu"])


def test_eval_writes_its_record_beside_each_output(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "git_state", lambda folder=None: None)   # no git: null
    config = EvalConfig(checkpoint="ck", data="d", split="test", batch_size=3)
    preds, scores = tmp_path / "ck" / "predictions_test.jsonl", tmp_path / "scores.json"
    preds.parent.mkdir()
    paths = record_eval(config, [str(preds), str(scores)], torch.device("cpu"), torch.bfloat16)
    assert paths == sorted([str(tmp_path / "ck" / "predictions_test.run.json"), str(tmp_path / "scores.run.json")])
    for path in paths:
        info = json.loads(open(path).read())
        assert info["stage"] == "eval" and info["git"] is None and info["precision"] == "bf16"
        assert info["config"]["split"] == "test" and info["batch"]["global"] == 3 and info["world_size"] == 1
    assert record_eval(config, [str(preds), ""], "cpu", torch.float32) == [paths[0]]    # no --json: one
    assert not os.path.exists(tmp_path / "ck" / "run.json")      # the checkpoint's own record is not touched


# ============================================================================ --wandb

def test_wandb_without_wandb_installed_is_one_line(monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r"^--wandb=proj: wandb is not installed; pip install wandb"):
        TrainConfig(wandb="proj")
    TrainConfig()                                     # without the flag nothing is asked
    with pytest.raises(SystemExit) as e:
        cli(lambda argv: parse_config(TrainConfig, argv), ["--wandb=proj"])
    assert e.value.code == 1
    assert capsys.readouterr().err == ("error: --wandb=proj: wandb is not installed; pip install wandb "
                                       "(or drop --wandb)\n")


def offline_records(run_dir):
    """The records of an offline run's `run-*.wandb` file (a LevelDB-style log of protobuf
    Records: 32 KiB blocks, each chunk with a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    raw, block, pos, chunk, records = open(path, "rb").read(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:                   # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = chunk + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):                            # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_logs_the_rows_of_metrics_jsonl_with_run_json_as_config(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (requirements-dev.txt pins it)")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), max_steps=4, batch_size=4, log_every=1, device="cpu", eval_every=2,
                         wandb="llava-slt-test")
    seed_everything(0)
    model = MLP()
    scores = iter([2.0, 1.0])
    fit(model, sum_step, ToyData(), make_optimizer(model, 1e-3, 0.0), config,
        evaluate=lambda m: {"dev_loss": next(scores)}, metric="dev_loss", higher_is_better=False)
    assert tracking._run is None                                    # finished at the end of fit
    wandb.teardown()          # the service process writes the run's file after finish returns: wait for it
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4] and "dev_loss" in rows[2]   # training and dev rows
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    records = offline_records(run_dir)
    history = [{key: json.loads(i.value_json) for i in r.history.item
                for key in [i.key or "/".join(i.nested_key)] if not key.startswith("_")}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert history == rows
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "llava-slt-test" and run.display_name == "run"
    logged = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert logged == read_run(out)
