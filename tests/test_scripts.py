"""End-to-end tests of the scripts as a user runs them: train_cpt.py -> train_vcp.py ->
train_vlt.py (connector, then --full_tune) -> eval.py, each a subprocess from the repo root
(`sys.executable`, OMP_NUM_THREADS=1), on one tiny synthetic dataset shared by the module.

What is checked, beyond "it ran":
- the trilogy: the output folders' contents, which weights full-tuning changes and which it
  keeps, eval's table / predictions / scores (recomputed from the predictions), the
  single-video path, the text-only and untrained baselines;
- the CPT folder (full and LoRA) loads in transformers with the same logits, LoRA merged;
- 2 gloo processes x batch b == 1 process x batch 2b (VCP, VLT connector);
- an interrupted run resumed with --resume=true == the uninterrupted run, bit for bit;
- cached word features == frames through the frozen encoder; the cache's fingerprint;
- labels supervise exactly the answer and the end-of-turn token;
- user errors exit 1 with one line on stderr naming the culprit.

The tiny shapes (2 CPU cores): CPT hidden 32 x 2 layers; VCP 32 px frames, ViT width 16 x 1
layer, patch 8, encoder width 32 with 1 local + 1 full layer, flat frame pooling.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as eval_cli  # noqa: E402
import train_cpt  # noqa: E402
import train_vcp  # noqa: E402
import train_vlt  # noqa: E402
from data import ClipDataset, VideoTransform  # noqa: E402
from readers import load_rows, read_corpus  # noqa: E402
from synth import synthesize  # noqa: E402
from losses import lm_loss  # noqa: E402
from model import LLM, LLaVASLT  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from cli import Dist, cli, parse_config  # noqa: E402
from training import seed_everything  # noqa: E402
from vision import VCPModel  # noqa: E402

PY = sys.executable
ENV = {k: v for k, v in os.environ.items() if k != "LLAVA_SLT_DEBUG"}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")

CPT_FLAGS = ["--hidden_size=32", "--num_layers=2", "--num_heads=2", "--num_kv_heads=1", "--intermediate_size=64",
             "--block_size=32", "--gloss_repeat=2", "--max_steps=4", "--batch_size=8", "--lr=3e-3",
             "--log_every=1", "--seed=0"]
# max_frames=20, stride 2: every synthetic clip has >= 40 frames, so every clip gives exactly 20
# frames -> 5 word features (the DDP test below relies on that)
VCP_FLAGS = ["--image_size=32", "--resize=32", "--stride=2", "--max_frames=20", "--frame_pool=flat",
             "--vit_tuning=full", "--vit_dim=16", "--vit_layers=1", "--vit_heads=2", "--patch_size=8", "--dim=32",
             "--heads=2", "--local_layers=1", "--window=3", "--full_layers=1", "--clip_dim=32",
             "--logit_scale_init=30", "--lr=2e-3", "--log_every=1", "--seed=0", "--max_steps=3", "--dropout=0"]
VLT_FLAGS = ["--max_steps=8", "--lr=2e-3", "--log_every=1", "--seed=0"]   # 48 clips / batch 8: steps 7, 8 in epoch 1
IGNORE = -100


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one thread


def run(args, rc=0, timeout=300):
    """`python ARGS` from the repo root; asserts the exit status, returns the CompletedProcess."""
    proc = subprocess.run([PY] + [str(a) for a in args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == rc, (f"{args[:2]} exited {proc.returncode}, expected {rc}\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def torchrun(args, timeout=300):
    """The script under `python -m torch.distributed.run`, 2 processes (gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)] + args, timeout=timeout)


# A run that dies like a killed job (os._exit: no cleanup, no final save) in the micro-batch
# number CRASH_AT of a script's `fit`, after the --save_every checkpoints before it were written.
_CRASH = """
import os, sys
import cli, training
script, crash_at = sys.argv[1], int(sys.argv[2])
module = __import__(script)
def fit(model, train_step, *args, **kwargs):
    calls = [0]
    def step(model, batch):
        calls[0] += 1
        if calls[0] == crash_at:
            os._exit(3)
        return train_step(model, batch)
    return training.fit(model, step, *args, **kwargs)
module.fit = fit
cli.cli(module.main, sys.argv[3:])
"""


def run_crashing(script, crash_at, args):
    return run(["-c", _CRASH, script, crash_at] + args, rc=3)


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def one_line_error(proc) -> str:
    """The single `error: ...` line a CLI prints for a user error."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ============================================================================ the shared pipeline

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """Synthetic data, then CPT (4 steps), VCP (3 steps, batch 8), VLT connector (8 steps, batch 8)."""
    root = tmp_path_factory.mktemp("pipe")
    data, cpt, vcp, vlt = (root / d for d in ("data", "cpt", "vcp", "vlt"))
    synthesize(data, seed=0, n_train=48, n_dev=4, n_test=8, n_corpus=200, workers=1, progress=False)
    logs = {
        "cpt": run(["train_cpt.py", f"--corpus={data}/corpus.jsonl", f"--out={cpt}"] + CPT_FLAGS).stdout,
        "vcp": run(["train_vcp.py", f"--data={data}", f"--text_from_llm={cpt}", f"--out={vcp}", "--batch_size=8"]
                   + VCP_FLAGS).stdout,
        "vlt": run(["train_vlt.py", f"--data={data}", f"--cpt={cpt}", f"--vcp={vcp}", f"--out={vlt}", "--batch_size=8"]
                   + VLT_FLAGS).stdout,
    }
    return SimpleNamespace(root=root, data=data, cpt=cpt, vcp=vcp, vlt=vlt, cache=root / "vlt_cache", logs=logs)


# ============================================================================ 1. the trilogy, end to end

@pytest.mark.slow
def test_trilogy_end_to_end(pipe, tmp_path):
    data = pipe.data
    # CPT: a Hugging Face folder; the loss went down over its 4 steps
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (pipe.cpt / name).is_file(), name
    rows = metrics(pipe.cpt)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    # VCP: the visual encoder + its teacher (an mBART-format folder) beside it
    rows = metrics(pipe.vcp)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["clip"] > 0 and r["signcl"] > 0 for r in rows)
    assert (pipe.vcp / "text_encoder" / "model.safetensors").is_file()
    # VLT connector: a LLaVA-SLT folder that names its LLM and encoder relative to itself
    config = json.loads((pipe.vlt / "config.json").read_text())
    assert {k: config[k] for k in ("format", "llm", "visual", "connector", "visual_dim", "visual_tokens", "language")} \
        == {"format": "llava-slt", "llm": "../cpt", "visual": "../vcp", "connector": "mlp", "visual_dim": 32,
            "visual_tokens": "word", "language": "German"}
    assert sorted(os.listdir(pipe.vlt)) == ["config.json", "connector.safetensors", "llava_slt_run.json", "metrics.jsonl",
                                          "run.json", "train_state"]
    # every stage's folder says how it was made: the flags resolved, the code, the batch, the precision
    for folder, stage, steps in ((pipe.cpt, "cpt", 4), (pipe.vcp, "vcp", 3), (pipe.vlt, "vlt", 8)):
        info = json.loads((folder / "run.json").read_text())
        assert info["stage"] == stage and info["world_size"] == 1 and info["precision"] == "fp32"
        assert info["batch"] == {"per_process": 8, "grad_accum": 1, "global": 8}
        assert info["config"]["out"] == str(folder) and info["config"]["max_steps"] == steps
        assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
        assert [(s["step"], s["resumed"]) for s in info["starts"]] == [(0, False)]
        assert info.get("negatives") == (7 if stage == "vcp" else None)    # the other 7 clips of the batch
    assert [r["step"] for r in metrics(pipe.vlt)] == list(range(1, 9))

    # full-tune from the connector folder: LoRA on the LLM, the visual encoder unfrozen
    full = tmp_path / "full"
    run(["train_vlt.py", f"--data={data}", f"--init={pipe.vlt}", "--full_tune=true", "--lora_r=4", "--lora_alpha=8",
         "--augment=false", "--cache_videos=true", f"--out={full}", "--max_steps=2", "--batch_size=8", "--lr=3e-4",
         "--log_every=1", "--seed=0"])
    resolved = LLaVASLT.read_config(str(full))
    assert os.path.samefile(resolved["llm"], pipe.cpt) and resolved["visual"] == os.path.join(str(full), "visual")
    adapter = json.loads((full / "llm_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    lora = load_file(full / "llm_adapter" / "adapter_model.safetensors")
    assert len(lora) == 2 * 4 * 2                       # A and B, 4 targets, 2 layers
    assert all(v.abs().max() > 0 for k, v in lora.items() if ".lora_B." in k)   # B started at zero: trained
    before, after = load_file(pipe.vcp / "model.safetensors"), load_file(full / "visual" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for k in before:
        # ViT, frame projection and local layers train; the CLIP heads are frozen, and the full
        # layers + query token (the sentence embedding) are not on the word-token path: unchanged
        same = (k.startswith(("video_proj.", "text_proj.", "logit_scale", "hier.full.", "hier.query"))
                or "mask_token" in k)
        assert torch.equal(before[k], after[k]) == same, k
    c0, c1 = load_file(pipe.vlt / "connector.safetensors"), load_file(full / "connector.safetensors")
    assert sorted(c0) == sorted(c1) and not any(torch.equal(c0[k], c1[k]) for k in c0)

    # eval on the test split: table, predictions (one row per clip, in order), scores
    test_rows = load_rows(data, "test")
    scores_path = tmp_path / "scores.json"
    common = [f"--checkpoint={full}", f"--data={data}", "--split=test", "--num_beams=2", "--max_new_tokens=12",
              "--batch_size=3"]          # 3 batches, the last one short
    out = run(["eval.py", f"--json={scores_path}"] + common).stdout.splitlines()
    preds = read_jsonl(full / "predictions_test.jsonl")          # the default place
    assert [p["id"] for p in preds] == [r["id"] for r in test_rows]
    assert [p["reference"] for p in preds] == [r["text"] for r in test_rows]
    hyps = [p["hypothesis"] for p in preds]
    assert all(isinstance(h, str) and h == h.strip() for h in hyps)
    scores = json.loads(scores_path.read_text())
    assert scores == eval_cli.score(hyps, [r["text"] for r in test_rows], "word")
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge"}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert out[0] == "test: 8 clips, word-level, references as the dataset gives them"
    assert [c.strip() for c in out[1].split("|")] == ["BLEU1", "BLEU2", "BLEU3", "BLEU4", "ROUGE"]
    assert [float(c) for c in out[2].split("|")] == [round(scores[k], 2) for k in scores]
    assert out[3] == f"BLEU signature: {eval_cli.bleu_signature()}"
    assert out[4] == f"predictions: {full / 'predictions_test.jsonl'}"
    # eval's record beside each output (the folder's own run.json is the full-tune's)
    for record in (full / "predictions_test.run.json", tmp_path / "scores.run.json"):
        info = json.loads(record.read_text())
        assert info["stage"] == "eval" and info["config"]["num_beams"] == 2 and info["precision"] == "fp32"
    assert json.loads((full / "run.json").read_text())["config"]["full_tune"] is True

    # one video: one line, the same sentence the batched split translation gave that clip
    clip = test_rows[0]
    line = run(["eval.py", f"--checkpoint={full}", f"--video={clip['video']}", "--num_beams=2",
                "--max_new_tokens=12"]).stdout
    assert line.endswith("\n") and len(line.splitlines()) == 1 and line.strip()
    assert line.strip() == hyps[0]
    # in bf16 (what --dtype=auto picks on CUDA) the whole model runs in that dtype and translates
    line = run(["eval.py", f"--checkpoint={full}", f"--video={clip['video']}", "--num_beams=2",
                "--max_new_tokens=12", "--dtype=bfloat16"]).stdout
    assert len(line.splitlines()) == 1 and line.strip()

    # the baselines run and are scored the same way
    for flag in ("--text_only=true", "--untrained=true"):
        path = tmp_path / f"pred_{flag[2:6]}.jsonl"
        run(["eval.py", flag, f"--predictions={path}", f"--json={tmp_path / 's.json'}"] + common)
        base = read_jsonl(path)
        assert [p["id"] for p in base] == [r["id"] for r in test_rows]
        assert json.loads((tmp_path / "s.json").read_text()) == eval_cli.score(
            [p["hypothesis"] for p in base], [r["text"] for r in test_rows])
        if flag.startswith("--text_only"):   # no visual tokens: every clip gets the same prompt, so the same answer
            assert len({p["hypothesis"] for p in base}) == 1


@pytest.mark.slow
def test_cpt_folders_load_in_transformers(pipe, tmp_path):
    import transformers  # a test dependency: missing, this must fail, not skip
    transformers.logging.set_verbosity_error()
    corpus = pipe.data / "corpus.jsonl"
    lora = tmp_path / "cpt_lora"
    run(["train_cpt.py", f"--corpus={corpus}", f"--out={lora}", "--lora_r=4", "--lora_alpha=8"] + CPT_FLAGS)
    tok = Tokenizer.from_pretrained(str(pipe.cpt))
    ids = torch.tensor([tok.encode("am montag gibt es im norden starken regen ."),
                        tok.encode("am freitag wird es am vormittag im westen kalt .")[:9]])   # (2, 9)
    for folder in (pipe.cpt, lora):
        ours = LLM.from_pretrained(str(folder))(ids)                           # (2, 9, V)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(ids).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
        assert ours.std() > 1e-3                    # not a degenerate model

    # LoRA is merged: the saved weights are plain; the targets hold W0 + B A alpha/r, the rest is W0
    saved = load_file(lora / "model.safetensors")
    assert sorted(saved) == sorted(load_file(pipe.cpt / "model.safetensors"))
    adapters = load_file(lora / "train_state" / "trainable.safetensors")      # what resume would load
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    config = parse_config(train_cpt.CPTConfig, [f"--corpus={corpus}"] + CPT_FLAGS)
    seed_everything(config.seed)                  # as train_cpt.main: seed, then the fresh model
    _, fresh = train_cpt.fresh_model(config, read_corpus(corpus))
    merged = 0
    for k, w0 in fresh.state_dict().items():
        if k == "lm_head.weight":              # tied to the embedding, saved once
            continue
        stem = k[:-len(".weight")]
        if f"{stem}.lora_A.weight" in adapters:
            a, b = adapters[f"{stem}.lora_A.weight"], adapters[f"{stem}.lora_B.weight"]
            assert b.abs().max() > 0, k
            torch.testing.assert_close(saved[k], w0 + b @ a * (8 / 4), rtol=0, atol=1e-6, msg=k)
            merged += 1
        else:
            assert torch.equal(saved[k], w0), k     # frozen under LoRA
    assert merged == 2 * 7                      # every linear of both layers


# ============================================================================ 2. DDP == one process, twice the batch

@pytest.mark.slow
def test_vcp_two_processes_equal_one_process_with_twice_the_batch(pipe, tmp_path):
    # Why the comparison is exact up to float rounding:
    # - the global batch is the same set of clips: DistributedSampler gives rank r the items
    #   r, r+2, ... of the one permutation the single process reads in order (48 clips, no padding);
    # - CLIP over the all-gathered batch does not depend on the order of the clips in it;
    # - augmentation and frame sampling are drawn per clip from (seed, epoch, index), so they
    #   stay on; dropout (drawn from each rank's own stream) is 0;
    # - SignCL draws its negatives from the global RNG, which differs between layouts, but with
    #   5 word features per clip and margin 2 every anchor has at most 4 candidates, so all are
    #   taken whatever the draw; and as every clip has 5 features (max_frames=20 <= 40/2), the
    #   mean over each rank's anchors averaged over ranks (loss / world_size) is the global mean.
    features = load_file(pipe.cache / "train-word.safetensors")   # eval sampling, same frame count
    assert len(features) == 48 and {len(f) for f in features.values()} == {5}

    ddp = tmp_path / "vcp_ddp"
    torchrun(["train_vcp.py", f"--data={pipe.data}", f"--text_from_llm={pipe.cpt}", f"--out={ddp}",
              "--batch_size=4"] + VCP_FLAGS)
    one, two = load_file(pipe.vcp / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert sorted(one) == sorted(two)
    for k in one:
        # Adam divides each gradient by its own running size, so an element whose gradient is
        # rounding-level takes a step of up to ~lr whose size is rounding too (a step is ~1e-3):
        # attention key biases (a bias shared by every key shifts a query's logits by a constant,
        # which softmax ignores but for RoPE's rotation; 2 of 32 elements 1.8e-5 apart) and the
        # odd frame_proj weight whose first gradient cancels to 1.8e-8 (median 2.7e-3; 3.2e-5
        # apart, 1 of 4,096). Every other element was measured <= 4.6e-6 apart.
        diff = (two[k] - one[k]).abs()
        assert diff.max() <= 1e-4 and int((diff > 1e-5).sum()) <= 2, (k, diff.max().item())
    m1, m2 = metrics(pipe.vcp), metrics(ddp)
    for key in ("loss", "clip", "signcl"):
        torch.testing.assert_close(torch.tensor([r[key] for r in m2]), torch.tensor([r[key] for r in m1]),
                                   rtol=1e-5, atol=0, msg=key)
    assert len({r["loss"] for r in m1}) == 3        # the steps changed the model
    info = json.loads((ddp / "run.json").read_text())
    assert info["world_size"] == 2 and info["batch"]["global"] == 8 and info["negatives"] == 7   # as one process's


@pytest.mark.slow
def test_vlt_two_processes_equal_one_process_with_twice_the_batch(pipe, tmp_path):
    # Connector stage on the cached features: no randomness but the shuffle (shared by both
    # layouts); the LM loss is a token sum over the global batch divided by its token count.
    # A stale cache on the way: rank 0 rebuilds it while rank 1 waits for it
    ddp, cache = tmp_path / "vlt_ddp", tmp_path / "cache" / "train-word.safetensors"
    built = load_file(pipe.cache / "train-word.safetensors")
    cache.parent.mkdir()
    save_file({k: v + 1 for k, v in built.items()}, cache, metadata={"fingerprint": "from another encoder"})
    out = torchrun(["train_vlt.py", f"--data={pipe.data}", f"--cpt={pipe.cpt}", f"--vcp={pipe.vcp}", f"--out={ddp}",
                    f"--cache={cache.parent}", "--batch_size=4"] + VLT_FLAGS).stdout
    assert f"word features: {cache} was made by another encoder or data; rebuilding it" in out
    with safe_open(str(cache), framework="pt") as f:
        assert f.metadata()["fingerprint"] == train_vlt.fingerprint(str(pipe.vcp), load_rows(pipe.data), "word")
    rebuilt = load_file(cache)
    assert sorted(rebuilt) == sorted(built)
    for k in built:     # the fixture's cache was made in batches of 8, this one in batches of 4
        torch.testing.assert_close(rebuilt[k], built[k], rtol=0, atol=1e-5)
    one, two = load_file(pipe.vlt / "connector.safetensors"), load_file(ddp / "connector.safetensors")
    assert sorted(one) == sorted(two) == ["proj.0.bias", "proj.0.weight", "proj.2.bias", "proj.2.weight"]
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
    l1, l2 = [r["loss"] for r in metrics(pipe.vlt)], [r["loss"] for r in metrics(ddp)]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    assert len(set(l1)) == 8


# ============================================================================ 3. resume is exact

@pytest.mark.slow
def test_vlt_resume_equals_the_uninterrupted_run(pipe, tmp_path):
    cut = tmp_path / "vlt_cut"
    args = [f"--data={pipe.data}", f"--cpt={pipe.cpt}", f"--vcp={pipe.vcp}", f"--out={cut}", f"--cache={pipe.cache}",
            "--batch_size=8", "--save_every=4"] + VLT_FLAGS
    run_crashing("train_vlt", 7, args)         # killed in step 7: checkpoint at 4, metrics rows up to 6
    assert json.loads((cut / "train_state" / "state.json").read_text())["step"] == 4
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3, 4, 5, 6]
    out = run(["train_vlt.py", "--resume=true"] + args).stdout
    assert f"resumed from {cut / 'train_state'} at step 4 (epoch 0, sample 32)" in out
    whole, resumed = metrics(pipe.vlt), metrics(cut)
    assert [r["step"] for r in resumed] == list(range(1, 9))            # rows 5, 6 rewritten, not doubled
    assert [(r["loss"], r["lr"], r["epoch"]) for r in resumed] == [(r["loss"], r["lr"], r["epoch"]) for r in whole]
    one, two = load_file(pipe.vlt / "connector.safetensors"), load_file(cut / "connector.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)
    starts = json.loads((cut / "run.json").read_text())["starts"]     # the killed start, then the resume
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (4, True)]
    assert "--resume=true" in starts[1]["argv"] and "--resume=true" not in starts[0]["argv"]


@pytest.fixture(scope="module")
def vcp_whole(pipe, tmp_path_factory):
    # dropout on, and up to 32 frames -> 8 word features (more SignCL candidates than the 4
    # negatives it draws): both draw from the RNG a resume must restore
    out = tmp_path_factory.mktemp("vcp_resume") / "whole"
    flags = [f"--data={pipe.data}", f"--text_from_llm={pipe.cpt}", "--batch_size=8"] + VCP_FLAGS + [
        "--max_frames=32", "--dropout=0.1", "--max_steps=4"]
    run(["train_vcp.py", f"--out={out}"] + flags)
    return out, flags


@pytest.mark.slow
@pytest.mark.parametrize("cache_videos", ["false", "true"])
def test_vcp_resume_equals_the_uninterrupted_run(vcp_whole, tmp_path, cache_videos):
    whole, flags = vcp_whole
    cut = tmp_path / "cut"
    args = flags + [f"--out={cut}", "--save_every=2", f"--cache_videos={cache_videos}"]
    run_crashing("train_vcp", 4, args)         # killed in step 4: checkpoint at 2
    assert json.loads((cut / "train_state" / "state.json").read_text())["step"] == 2
    out = run(["train_vcp.py", "--resume=true"] + args).stdout
    assert f"resumed from {cut / 'train_state'} at step 2 (epoch 0, sample 16)" in out
    keys = ("step", "loss", "clip", "signcl", "lr")
    assert [[r[k] for k in keys] for r in metrics(cut)] == [[r[k] for k in keys] for r in metrics(whole)]
    one, two = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)


# ============================================================================ 4. cached features == frames

@pytest.mark.slow
def test_cached_features_equal_frames_through_the_frozen_encoder(pipe):
    model = LLaVASLT.load(str(pipe.vlt), VCPModel.load)           # trained connector, frozen encoder (eval)
    tok = Tokenizer.from_pretrained(str(pipe.cpt))
    rows = load_rows(pipe.data, "train")
    path = pipe.cache / "train-word.safetensors"
    with safe_open(str(path), framework="pt") as f:               # the CLI's cache, made by this encoder
        assert f.metadata()["fingerprint"] == train_vlt.fingerprint(str(pipe.vcp), rows, "word")
    features = load_file(path)

    picked = rows[:4]
    cached = train_vlt.CachedVLTDataset(picked, features, tok, model.config["system"])
    batch = train_vlt.collate_cached([cached[i] for i in range(4)], tok.pad_token_id)
    vc = model.visual_encoder.config
    clips = ClipDataset(picked, VideoTransform(vc.image_size, vc.resize, train=False), max_frames=vc.max_frames,
                        stride=vc.stride, train=False)        # the frames the cache was built from
    video = train_vlt.VideoVLTDataset(clips, tok, model.config["system"], lambda T: math.ceil(T / vc.hier.step))
    vbatch = train_vlt.collate_video([video[i] for i in range(4)], tok.pad_token_id)
    for k in ("input_ids", "labels", "attention_mask", "slot_mask"):
        assert torch.equal(batch[k], vbatch[k]), k                # ceil(T / step) slots == cached feature count
    with torch.no_grad():
        logits_c = model(batch["input_ids"], batch["attention_mask"], batch["slot_mask"],
                         batch["word_features"], batch["word_mask"])       # (4, L, V)
        logits_f = model(vbatch["input_ids"], vbatch["attention_mask"], vbatch["slot_mask"],
                         frames=vbatch["frames"], frame_mask=vbatch["frame_mask"])
    loss_c, n_c = lm_loss(logits_c, batch["labels"])
    loss_f, n_f = lm_loss(logits_f, vbatch["labels"])
    assert n_c == n_f > 0
    torch.testing.assert_close(loss_c, loss_f, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_c, logits_f, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cache_is_rebuilt_when_the_encoder_or_its_frames_change(pipe, tmp_path, capsys):
    rows = load_rows(pipe.data, "train")[:4]
    vcp = tmp_path / "vcp"
    shutil.copytree(pipe.vcp, vcp, ignore=shutil.ignore_patterns("train_state", "metrics.jsonl"))
    model = LLaVASLT.load(str(pipe.vlt), VCPModel.load)
    path = str(tmp_path / "cache" / "train-word.safetensors")

    def build():
        model.visual_encoder = VCPModel.load(str(vcp))
        key = train_vlt.fingerprint(str(vcp), rows, "word")
        capsys.readouterr()
        feats = train_vlt.build_cache(path, model, rows, Dist(), 4, 0, key)
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["fingerprint"] == key
        return key, feats, capsys.readouterr().out

    key1, feats1, log = build()                                   # new: built (no log line, a progress bar)
    assert "word features:" not in log and sorted(feats1) == [r["id"] for r in rows]
    reference = load_file(pipe.cache / "train-word.safetensors")  # the CLI built the same features in batches of 8
    for k, v in feats1.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-5)
    stamp = os.stat(path).st_mtime_ns
    key, _, log = build()                                         # unchanged: reused
    assert key == key1 and f"word features: using the cache {path}" in log and os.stat(path).st_mtime_ns == stamp

    weights = load_file(vcp / "model.safetensors")                # another checkpoint: rebuilt
    weights["hier.local.norm.weight"] = weights["hier.local.norm.weight"] + 0.5
    save_file(weights, vcp / "model.safetensors")
    key2, feats2, log = build()
    assert key2 != key1 and f"word features: {path} was made by another encoder or data; rebuilding it" in log
    assert all(not torch.allclose(feats1[k], feats2[k]) for k in feats1)

    config = json.loads((vcp / "config.json").read_text())       # other frames (max_frames 20 -> 8): rebuilt
    config["max_frames"] = 8
    (vcp / "config.json").write_text(json.dumps(config))
    key3, feats3, log = build()
    assert key3 not in (key1, key2) and "rebuilding it" in log
    assert {len(v) for v in feats2.values()} == {5} and {len(v) for v in feats3.values()} == {2}


# ============================================================================ 5. response-only labels

@pytest.mark.slow
def test_vlt_labels_are_the_answer_and_the_end_of_turn_token(pipe):
    tok = Tokenizer.from_pretrained(str(pipe.cpt))
    rows = load_rows(pipe.data, "train")[:3]
    features = load_file(pipe.cache / "train-word.safetensors")
    system = train_vlt.prompt_system(train_vlt.VLTConfig(), "German")
    ds = train_vlt.CachedVLTDataset(rows, features, tok, system)
    batch = train_vlt.collate_cached([ds[i] for i in range(3)], tok.pad_token_id)
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end in tok.eos_token_ids
    for i, row in enumerate(rows):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        sup = labels != IGNORE
        assert torch.equal(labels[sup], ids[sup])               # aligned with input_ids; lm_loss shifts
        where = sup.nonzero().flatten()
        assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1))   # one contiguous span
        answer = ids[sup].tolist()
        assert answer == tok.encode(row["text"]) + [im_end]
        assert tok.decode(answer[:-1]) == row["text"]
        assert tok.decode(answer, skip_special_tokens=False) == row["text"] + " <|im_end|>"
        n = len(features[row["id"]])
        slots = batch["slot_mask"][i]
        assert int(slots.sum()) == n == int(batch["word_mask"][i].sum())
        assert torch.equal(batch["word_features"][i, :n], features[row["id"]])
        first = int(slots.nonzero()[0])
        assert slots[first:first + n].all() and first + n < int(where[0])   # the visual tokens precede the answer
        prompt, sys_ids = ids[:first].tolist(), tok.encode(system)           # the system turn comes first
        assert any(prompt[j:j + len(sys_ids)] == sys_ids for j in range(first))


# ============================================================================ 6. user errors through the CLIs
# Each kind once as a subprocess (the real command line); the same error of the other scripts
# in-process through `cli.cli`, what their `__main__` calls (a subprocess costs seconds).

def cli_error(main, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(main, [str(a) for a in argv])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_flag_lists_the_valid_ones(capsys):
    line = one_line_error(run(["train_vlt.py", "--lr_typo=1"], rc=1))
    assert line.startswith("error: unknown option --lr_typo; valid options: --out --epochs --max_steps ")
    assert " --lr --weight_decay " in line and line.endswith(" --cache_videos --dtype --dev_split --eval_max_new_tokens")
    for main, valid in [(train_cpt.main, "--corpus"), (train_vcp.main, "--text_from_llm"),
                        (eval_cli.main, "--checkpoint")]:
        line = cli_error(main, ["--lr_typo=1"], capsys)
        assert line.startswith("error: unknown option --lr_typo; valid options: ") and f" {valid} " in line


def test_eval_refuses_a_folder_that_is_not_llava_slt(tmp_path, capsys):
    hf = tmp_path / "some_llm"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32}))
    line = one_line_error(run(["eval.py", f"--checkpoint={hf}", f"--video={tmp_path / 'x.mp4'}"], rc=1))
    assert line == (f'error: {hf / "config.json"}: not a LLaVA-SLT folder '
                    '(train_vlt.py writes one with "format": "llava-slt")')
    line = cli_error(eval_cli.main, [f"--checkpoint={tmp_path}", f"--video={tmp_path / 'x.mp4'}"], capsys)
    assert line == f"error: {tmp_path}: no config.json; not a LLaVA-SLT folder (train_vlt.py writes one)"


def test_manifest_row_with_empty_text(tmp_path, capsys):
    (tmp_path / "a.mp4").write_bytes(b"\0" * 16)
    (tmp_path / "b.mp4").write_bytes(b"\0" * 16)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"id": "a", "video": "a.mp4", "text": "am montag regnet es ."}) + "\n"
                        + json.dumps({"id": "b", "video": "b.mp4", "text": "  "}) + "\n")
    expected = f"error: {manifest} row 2: no text or empty 'text'; every row needs its spoken sentence"
    out = tmp_path / "out"
    assert one_line_error(run(["train_vcp.py", f"--data={tmp_path}", "--text_from_llm=llm", f"--out={out}"],
                              rc=1)) == expected
    assert cli_error(train_vlt.main, [f"--data={tmp_path}", f"--out={out}"], capsys) == expected
    assert not out.exists()


@pytest.mark.slow
def test_eval_on_a_corrupt_video(pipe, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8).numpy().tobytes())
    line = one_line_error(run(["eval.py", f"--checkpoint={pipe.vlt}", f"--video={bad}"], rc=1))
    assert line.startswith(f"error: {bad}: cannot decode video") and "corrupt" in line


@pytest.mark.slow
def test_train_vlt_with_a_missing_vcp_folder(pipe, tmp_path):
    missing = tmp_path / "no_such_vcp"
    out = tmp_path / "vlt"
    line = one_line_error(run(["train_vlt.py", f"--data={pipe.data}", f"--cpt={pipe.cpt}", f"--vcp={missing}",
                               f"--out={out}", "--max_steps=1"], rc=1))
    assert line.startswith(f"error: {missing / 'config.json'}: not found") and "VCP folder" in line
    assert not out.exists()


# ============================================================================ nothing a user owns is lost

def _tree(pipe, dst):
    """A copy of the pipeline's cpt/vcp/vlt folders (same relative layout), to damage freely."""
    for name in ("cpt", "vcp", "vlt"):
        shutil.copytree(getattr(pipe, name), dst / name)
    return SimpleNamespace(cpt=dst / "cpt", vcp=dst / "vcp", vlt=dst / "vlt")


@pytest.mark.slow
def test_outputs_never_replace_a_users_folder_or_an_input(pipe, tmp_path, capsys):
    llm = tmp_path / "llm"
    shutil.copytree(pipe.cpt, llm, ignore=shutil.ignore_patterns("train_state", "metrics.jsonl", "llava_slt_run.json",
                                                                "run.json"))
    (llm / "LICENSE").write_text("a downloaded model's license")
    before = sorted(os.listdir(llm))
    corpus = pipe.data / "corpus.jsonl"
    assert cli_error(train_cpt.main, [f"--corpus={corpus}", f"--init={llm}", f"--out={llm}"], capsys) == (
        f"error: --out={llm} is also where --init={llm} is read from; a run never writes over its inputs: "
        "choose another --out")
    line = cli_error(train_vcp.main, [f"--data={pipe.data}", f"--text_from_llm={llm}", f"--out={llm}"], capsys)
    assert line.startswith(f"error: --out={llm} is also where --text_from_llm={llm} is read from")
    line = cli_error(train_vlt.main, [f"--data={pipe.data}", f"--cpt={pipe.cpt}", f"--vcp={pipe.vcp}", f"--out={llm}"],
                     capsys)  # a Hugging Face folder (weights, tokenizer, license) is the user's
    assert line == (f"error: --out={llm}: exists and was not written by a llava-slt run (no llava_slt_run.json); "
                    "nothing in it is replaced: choose another folder")
    line = cli_error(train_vlt.main, [f"--data={pipe.data}", f"--cpt={pipe.cpt}", f"--vcp={pipe.vcp}",
                                      f"--out={pipe.vcp}"], capsys)
    assert line.startswith(f"error: --out={pipe.vcp} is also where --vcp=")
    assert sorted(os.listdir(llm)) == before and (llm / "LICENSE").read_text() == "a downloaded model's license"
    assert not (tmp_path / "llm_cache").exists()


@pytest.mark.slow
def test_a_corrupt_or_half_written_file_gives_one_line_naming_it(pipe, tmp_path, capsys):
    t = _tree(pipe, tmp_path)
    clip = load_rows(pipe.data, "test")[0]["video"]
    full = tmp_path / "full"                       # a full-tuned folder: llm_adapter/ and visual/
    model = LLaVASLT.load(str(t.vlt), VCPModel.load)
    from model import apply_lora
    apply_lora(model.llm, ("q_proj", "v_proj"), 2, 4)
    model.save(str(full), str(t.cpt), str(t.vcp), {k: model.config[k] for k in ("language", "prompt", "system")},
               save_visual=model.visual_encoder.save)
    files = [t.vlt / "connector.safetensors", t.vcp / "model.safetensors", full / "visual" / "model.safetensors",
             full / "llm_adapter" / "adapter_model.safetensors", t.vlt / "config.json", t.vcp / "config.json",
             full / "llm_adapter" / "adapter_config.json"]
    for path in files:
        good = path.read_bytes()
        damaged = ([good[:len(good) // 2], good[:len(good) - 3]] if path.suffix == ".json" else
                   [good[:len(good) - 40], b"\xff" * 8 + good[8:], good[:8] + b"[" + good[9:]])  # truncated, header
        for bad in damaged:
            path.write_bytes(bad)
            ckpt = full if "full" in str(path) else t.vlt
            line = cli_error(eval_cli.main, [f"--checkpoint={ckpt}", f"--video={clip}"], capsys)
            assert line.startswith(f"error: {path}: not "), (path, line)
            assert "truncated or corrupt" in line, line
        path.write_bytes(good)
    # resume state: a half-written state.json, a truncated optimizer file
    for name in ("state.json", "optimizer.safetensors"):
        path = t.vlt / "train_state" / name
        good = path.read_bytes()
        path.write_bytes(good[:len(good) // 2])
        capsys.readouterr()
        with pytest.raises(SystemExit):   # read once the word features are cached (their progress bar above)
            cli(train_vlt.main, [f"--data={pipe.data}", f"--cpt={t.cpt}", f"--vcp={t.vcp}", f"--out={t.vlt}",
                                 "--resume=true", "--batch_size=8"] + VLT_FLAGS)
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {path}: not ") and "truncated or corrupt" in errors[0]
        path.write_bytes(good)


@pytest.mark.slow
def test_a_changed_encoder_is_refused_and_an_interrupted_save_is_read(pipe, tmp_path, capsys):
    t = _tree(pipe, tmp_path)
    clip = load_rows(pipe.data, "test")[0]["video"]
    # a kill between the two renames of a save leaves FOLDER.old only: every reader reads it
    os.rename(t.vlt, str(t.vlt) + ".old")
    os.rename(t.vcp, str(t.vcp) + ".old")
    model = LLaVASLT.load(str(t.vlt), VCPModel.load)
    assert model.config["folder"] == str(t.vlt) + ".old" and model.config["visual"] == str(t.vcp) + ".old"
    capsys.readouterr()
    cli(eval_cli.main, [f"--checkpoint={t.vlt}", f"--video={clip}"])
    assert capsys.readouterr().out.strip()
    os.rename(str(t.vlt) + ".old", t.vlt)
    os.rename(str(t.vcp) + ".old", t.vcp)
    # the encoder behind --vcp changed since the connector was trained on it: refused everywhere
    weights = load_file(t.vcp / "model.safetensors")
    weights["hier.local.norm.weight"] = weights["hier.local.norm.weight"] + 0.5
    save_file(weights, t.vcp / "model.safetensors")
    expected = (f"error: {t.vcp / 'model.safetensors'}: the visual encoder changed since {t.vlt} was trained on it "
                "(another sha256); train the connector again on this encoder, or restore the encoder it was trained on")
    assert cli_error(eval_cli.main, [f"--checkpoint={t.vlt}", f"--video={clip}"], capsys) == expected
    assert cli_error(train_vlt.main, [f"--data={pipe.data}", f"--init={t.vlt}", "--full_tune=true",
                                      f"--out={tmp_path / 'full'}"], capsys) == expected
    line = cli_error(train_vlt.main, [f"--data={pipe.data}", f"--cpt={t.cpt}", f"--vcp={t.vcp}", f"--out={t.vlt}",
                                      "--resume=true", "--batch_size=8"] + VLT_FLAGS, capsys)
    assert line.startswith(f"error: --resume: {t.vlt} was trained on another visual encoder than {t.vcp}")


@pytest.mark.slow
def test_a_regenerated_video_invalidates_the_cache(pipe, tmp_path):
    rows = [dict(r) for r in load_rows(pipe.data, "train")[:3]]
    for r in rows:
        shutil.copy(r["video"], tmp_path / os.path.basename(r["video"]))
        r["video"] = str(tmp_path / os.path.basename(r["video"]))
    frames = tmp_path / "frames"                  # a frame folder (Phoenix, CSL-Daily)
    frames.mkdir()
    for i in range(3):
        (frames / f"{i:03d}.png").write_bytes(b"png" * (i + 1))
    rows.append({"id": "f", "video": str(frames)})
    key = train_vlt.fingerprint(str(pipe.vcp), rows, "word")
    assert train_vlt.fingerprint(str(pipe.vcp), rows, "word") == key
    path = rows[0]["video"]                        # re-encoded in place: other bytes, same name
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-1])
    key2 = train_vlt.fingerprint(str(pipe.vcp), rows, "word")
    assert key2 != key
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # rewritten with the same size
    assert train_vlt.fingerprint(str(pipe.vcp), rows, "word") not in (key, key2)
    key3 = train_vlt.fingerprint(str(pipe.vcp), rows, "word")
    (frames / "002.png").write_bytes(b"other frame!")  # a frame folder extracted again
    assert train_vlt.fingerprint(str(pipe.vcp), rows, "word") != key3


@pytest.mark.slow
def test_eval_checks_its_outputs_before_translating(pipe, tmp_path, capsys):
    line = cli_error(eval_cli.main, [f"--checkpoint={pipe.vlt}", f"--data={pipe.data}", f"--json={tmp_path}"], capsys)
    assert line.startswith(f"error: --json={tmp_path}: cannot write a file there")
    line = cli_error(eval_cli.main, [f"--checkpoint={pipe.vlt}", f"--data={pipe.data}",
                                     f"--predictions={tmp_path / 'no' / 'p.jsonl'}"], capsys)
    assert line.startswith(f"error: --predictions={tmp_path / 'no' / 'p.jsonl'}: cannot write a file there")


@pytest.mark.slow
def test_a_prompt_longer_than_the_llm_stops_naming_the_clip(pipe, tmp_path, capsys):
    limit = LLM.from_pretrained(LLaVASLT.read_config(str(pipe.vlt))["llm"]).config.max_position_embeddings
    line = cli_error(eval_cli.main, [f"--checkpoint={pipe.vlt}", f"--data={pipe.data}", "--split=test",
                                     f"--max_new_tokens={limit - 8}", f"--json={tmp_path / 's.json'}",
                                     f"--predictions={tmp_path / 'p.jsonl'}"], capsys)
    assert re.match(r"error: clip \S+: its prompt with \d+ visual tokens is \d+ tokens, more than the 8 positions", line)


@pytest.mark.slow
def test_a_data_error_in_a_loader_worker_is_one_line(pipe, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 4000)
    rows = [{"id": f"c{i}", "video": "bad.mp4" if i == 5 else str(r["video"]), "text": r["text"]}
            for i, r in enumerate(load_rows(pipe.data, "train")[:8])]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    line = cli_error(train_vcp.main, [f"--data={tmp_path}", f"--text_from_llm={pipe.cpt}", f"--out={tmp_path / 'o'}",
                                      "--num_workers=1", "--batch_size=4"] + VCP_FLAGS, capsys)
    assert line.startswith(f"error: {bad}: cannot decode video"), line


def test_full_tuning_takes_the_papers_learning_rate_unless_given():
    assert parse_config(train_vlt.VLTConfig, []).lr == 1e-3
    assert parse_config(train_vlt.VLTConfig, ["--full_tune=true"]).lr == 1e-5
    assert parse_config(train_vlt.VLTConfig, ["--full_tune=true", "--lr=3e-4"]).lr == 3e-4


# ============================================================================ validation

@pytest.mark.slow
def test_vcp_validation_scores_the_saved_best(pipe, tmp_path):
    out = tmp_path / "vcp"
    run(["train_vcp.py", f"--data={pipe.data}", f"--text_from_llm={pipe.cpt}", f"--out={out}", "--batch_size=8",
         "--eval_every=1"] + VCP_FLAGS)
    dev = [r for r in metrics(out) if "dev_loss" in r]
    assert [r["step"] for r in dev] == [1, 2, 3] and all(0 <= r["dev_r1"] <= 100 for r in dev)
    best = min(dev, key=lambda r: r["dev_loss"])
    assert all(r["best_step"] == best["step"] for r in dev if r["step"] >= best["step"])
    model = VCPModel.load(str(out), with_text_encoder=True)
    rows = load_rows(pipe.data, "dev")
    clips = ClipDataset(rows, VideoTransform(32, 32, train=False), max_frames=20, stride=2, train=False)
    sentence = train_vcp.encode_sentences(model.text_encoder, [r["text"] for r in rows], "de_DE", "cpu")
    again = train_vcp.validate(model.eval(), clips, sentence, Dist(), 8)   # the folder holds the best
    assert again["dev_loss"] == pytest.approx(best["dev_loss"], rel=1e-5) and again["dev_r1"] == best["dev_r1"]


@pytest.mark.slow
def test_vlt_validation_equals_eval_and_two_processes(pipe, tmp_path):
    cpt = tmp_path / "cpt"  # an LLM that writes words (the fixture's 4 CPT steps write one token over and over)
    run(["train_cpt.py", f"--corpus={pipe.data}/corpus.jsonl", f"--out={cpt}"] + CPT_FLAGS
        + ["--max_steps=40", "--lr=1e-2", "--log_every=40"])
    args = [f"--data={pipe.data}", f"--cpt={cpt}", f"--vcp={pipe.vcp}", f"--cache={pipe.cache}",
            "--eval_every=2", "--eval_max_new_tokens=12", "--patience=2"] + VLT_FLAGS
    one, two = tmp_path / "one", tmp_path / "two"
    out = run(["train_vlt.py", f"--out={one}", "--batch_size=8"] + args).stdout
    assert "| dev dev_bleu4 " in out
    dev = [r for r in metrics(one) if "dev_bleu4" in r]
    assert any(r["dev_rouge"] > 0 for r in dev)
    # patience 2: the run stops at the second validation in a row without a new best
    bad, stop = 0, None
    for r in dev:
        bad = 0 if r["best_step"] == r["step"] else bad + 1
        if bad == 2:
            stop = r["step"]
            break
    assert stop is not None and stop < 8 and dev[-1]["step"] == stop and f"stopped at step {stop}" in out
    best = next(r for r in dev if r["step"] == dev[-1]["best_step"])
    scores = tmp_path / "s.json"
    run(["eval.py", f"--checkpoint={one}", f"--data={pipe.data}", "--split=dev", "--num_beams=1",
         "--max_new_tokens=12", "--batch_size=8", f"--json={scores}"])
    got = json.loads(scores.read_text())
    assert got["bleu4"] == pytest.approx(best["dev_bleu4"], abs=1e-9)
    assert got["rouge"] == pytest.approx(best["dev_rouge"], abs=1e-9)
    # 2 processes x batch 4: the dev set split across ranks, the same scores and decisions
    torchrun(["train_vlt.py", f"--out={two}", "--batch_size=4"] + args)
    dev2 = [r for r in metrics(two) if "dev_bleu4" in r]
    assert [(r["step"], r["best_step"]) for r in dev2] == [(r["step"], r["best_step"]) for r in dev]
    for a, b in zip(dev, dev2):
        assert b["dev_rouge"] == pytest.approx(a["dev_rouge"], abs=1e-9) and b["dev_bleu4"] == pytest.approx(
            a["dev_bleu4"], abs=1e-9)


@pytest.mark.slow
def test_sentence_level_ablation_trains_and_translates(pipe, tmp_path, capsys):
    vlt, full, vcp = tmp_path / "vlt", tmp_path / "full", tmp_path / "vcp"
    common = [f"--data={pipe.data}", "--batch_size=8", "--max_steps=2", "--visual_tokens=sentence"]
    # one full-attention layer: its penultimate output is the word features, so the ablation would change nothing
    line = cli_error(train_vlt.main, [f"--cpt={pipe.cpt}", f"--vcp={pipe.vcp}", f"--out={vlt}"] + common, capsys)
    assert line == (f"error: --visual_tokens=sentence takes the full-attention transformer's penultimate layer, but "
                    f"{pipe.vcp} has 1 full layer(s): that is the word features themselves; train VCP with "
                    "--full_layers >= 2")
    run(["train_vcp.py", f"--data={pipe.data}", f"--text_from_llm={pipe.cpt}", f"--out={vcp}", "--batch_size=8"]
        + [f for f in VCP_FLAGS if not f.startswith(("--full_layers", "--max_steps"))] + ["--full_layers=2", "--max_steps=1"])
    run(["train_vlt.py", f"--cpt={pipe.cpt}", f"--vcp={vcp}", f"--out={vlt}", f"--cache={tmp_path / 'c'}"] + common)
    features = load_file(tmp_path / "c" / "train-sentence.safetensors")
    assert {len(v) for v in features.values()} == {5}              # one per downsampled position, as words
    run(["train_vlt.py", f"--init={vlt}", "--full_tune=true", f"--out={full}"] + common)
    model = LLaVASLT.load(str(full), VCPModel.load)
    assert model.visual_tokens == "sentence"
    out = run(["eval.py", f"--checkpoint={full}", f"--data={pipe.data}", "--split=test", "--num_beams=1",
               "--max_new_tokens=4", f"--json={tmp_path / 's.json'}"]).stdout
    assert "BLEU4" in out


@pytest.mark.slow
def test_vcp_with_an_llm_as_text_supervisor(pipe, tmp_path):
    out = tmp_path / "vcp"
    run(["train_vcp.py", f"--data={pipe.data}", f"--text_encoder={pipe.cpt}", f"--out={out}", "--batch_size=8"]
        + VCP_FLAGS[:-2] + ["--max_steps=1"])
    from vision import LLMTextEncoder
    model = VCPModel.load(str(out), with_text_encoder=True)
    assert isinstance(model.text_encoder, LLMTextEncoder) and model.config.text_dim == 32   # the CPT LLM's width


def test_vcp_objective_is_clip_plus_weighted_signcl():
    """Eq. 2 with its real value and gradients: detaching SignCL or dropping its weight fails."""
    from losses import clip_loss, signcl_loss
    g = torch.Generator().manual_seed(0)
    words = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    out = {"video_emb": torch.randn(3, 4, generator=g, requires_grad=True), "text_emb": torch.randn(3, 4, generator=g),
           "logit_scale": torch.tensor(10.0), "word_features": words, "word_mask": torch.ones(3, 6, dtype=torch.bool)}
    text_words = torch.tensor([2, 3, 4])
    torch.manual_seed(1)                              # SignCL draws its negatives from the global RNG
    loss, count, logs = train_vcp.objective(out, text_words, 0.25)
    torch.manual_seed(1)
    clip = clip_loss(out["video_emb"], out["text_emb"], out["logit_scale"])
    signcl = signcl_loss(words, out["word_mask"], text_words)
    assert count is None and signcl.item() > 0.1
    assert loss.item() == pytest.approx(clip.item() + 0.25 * signcl.item(), rel=1e-6)
    assert logs["clip"].item() == pytest.approx(clip.item()) and logs["signcl"].item() == pytest.approx(signcl.item())
    grad, = torch.autograd.grad(loss, words)
    torch.manual_seed(1)
    ref, = torch.autograd.grad(0.25 * signcl_loss(words, out["word_mask"], text_words), words)
    torch.testing.assert_close(grad, ref)             # the word features learn from SignCL, weighted


def test_vcp_refuses_a_contrastive_batch_of_one_pair_at_start_up(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "llm").mkdir()
    with pytest.raises(SystemExit):
        cli(train_vcp.main, [f"--data={tmp_path / 'data'}", f"--text_from_llm={tmp_path / 'llm'}",
                             f"--out={tmp_path / 'out'}", "--batch_size=1", "--device=cpu"])
    err = capsys.readouterr().err
    assert err.startswith("error: --batch_size=1 on 1 process(es): a contrastive batch of one pair has no negatives")
    assert err.count("\n") == 1
