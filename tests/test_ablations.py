"""Tests for ablations.py (`make ablations`): the plan of runs (shared stages once, each variant's
one change reaching its script), the results (mean, sd, the `reproduced` rule), and, on the
--quick setting, one whole run of every variant: its files, and resume (nothing run twice; a
deleted output, and what reads it, run again; a training run cut short continued)."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ablations  # noqa: E402
import eval as eval_cli  # noqa: E402
import train_cpt  # noqa: E402
import train_vcp  # noqa: E402
import train_vlt  # noqa: E402
from ablations import VARIANTS, AblationsConfig, plan  # noqa: E402
from cli import parse_config  # noqa: E402
from errors import UserError  # noqa: E402

CONFIGS = {"cpt": train_cpt.CPTConfig, "vcp": train_vcp.VCPTrainConfig, "vlt": train_vlt.VLTConfig,
           "tune": train_vlt.VLTConfig, "eval": eval_cli.EvalConfig}


def folders(runs, stage, seed=0):
    return [os.path.basename(r.output) for r in runs if r.stage == stage and r.seed == seed]


# ============================================================================ the plan

def test_default_plan_trains_each_shared_stage_once():
    runs = plan(AblationsConfig())
    assert len(runs) == 3 * 35 and len({r.output for r in runs}) == len(runs)
    for seed in (0, 1, 2):
        count = Counter(r.stage for r in runs if r.seed == seed)
        assert count == {"data": 1, "cpt": 2, "vcp": 4, "vlt": 9, "tune": 9, "eval": 10}
        assert folders(runs, "cpt", seed) == ["cpt", "cpt_no_pairs"]
        assert sorted(folders(runs, "vcp", seed)) == ["vcp_full", "vcp_no_local", "vcp_no_vcp", "vcp_signcl0"]
        assert len(folders(runs, "eval", seed)) == len(VARIANTS)
    position = {id(r): i for i, r in enumerate(runs)}
    assert all(position[id(i)] < position[id(r)] for r in runs for i in r.inputs)   # inputs run first


def test_every_command_parses_and_carries_its_variants_change():
    runs = {(r.seed, r.stage, r.name): r for r in plan(AblationsConfig(seeds="0"))}
    flags = {key: parse_config(CONFIGS[key[1]], r.args[1:]) for key, r in runs.items() if key[1] in CONFIGS}
    assert flags[0, "vcp", "no_local"].local_layers == 0 and flags[0, "vcp", "full"].local_layers == 1
    assert flags[0, "vcp", "no_local"].step == 1 and flags[0, "vcp", "full"].step == 4   # frame-level tokens
    assert flags[0, "vcp", "signcl0"].signcl_weight == 0 and flags[0, "vcp", "full"].signcl_weight == 0.01
    assert (flags[0, "vcp", "no_vcp"].max_steps, flags[0, "vcp", "no_vcp"].lr) == (1, 1e-8)
    for stage in ("vlt", "tune"):
        assert flags[0, stage, "linear_connector"].connector == "linear"
        assert flags[0, stage, "sentence_tokens"].visual_tokens == "sentence"
        assert flags[0, stage, "no_format_prompt"].prompt == "no_format"
        assert flags[0, stage, "no_prompt"].prompt == "none"
    assert flags[0, "tune", "full"].full_tune and not flags[0, "vlt", "full"].full_tune
    # cpt_no_pairs: its own CPT on the filtered corpus, the full recipe's VCP (taught by the full CPT)
    assert flags[0, "cpt", "cpt_no_pairs"].corpus.endswith("corpus_no_pairs.jsonl")
    assert flags[0, "vlt", "cpt_no_pairs"].cpt.endswith("cpt_no_pairs")
    assert flags[0, "vlt", "cpt_no_pairs"].vcp == flags[0, "vlt", "full"].vcp
    assert all(f.text_from_words == 128 and not f.text_from_llm for k, f in flags.items() if k[1] == "vcp")
    assert all([i.stage for i in r.inputs] == ["data"] for k, r in runs.items() if k[1] == "vcp")  # CPT's twin
    # connector_only: the full recipe's connector folder, no training of its own
    assert flags[0, "eval", "connector_only"].checkpoint == flags[0, "tune", "full"].init
    assert flags[0, "eval", "full"].checkpoint == flags[0, "tune", "full"].out
    assert all(f.num_beams == 4 and f.split == "test" for k, f in flags.items() if k[1] == "eval")
    # the full recipe is the demo's, flag for flag (the cache folder aside)
    import demo
    recipe = demo.DemoConfig(seed=0)
    vlt = runs[0, "vlt", "full"]
    assert vlt.args[:-1] == demo.vlt_args(recipe, *(vlt.args[i].split("=", 1)[1] for i in (1, 2, 3, 4)))
    assert runs[0, "vcp", "full"].args == demo.vcp_args(recipe, *(runs[0, "vcp", "full"].args[i].split("=", 1)[1]
                                                                   for i in (1, 3)))


def test_a_subset_of_variants_keeps_the_full_recipe():
    runs = plan(AblationsConfig(seeds="4", variants="no_prompt"))
    assert [r.label for r in runs] == [
        "seed 4 data", "seed 4 cpt full", "seed 4 vcp full", "seed 4 vlt full", "seed 4 tune full",
        "seed 4 eval full", "seed 4 vlt no_prompt", "seed 4 tune no_prompt", "seed 4 eval no_prompt"]
    assert all(os.sep + "seed4" + os.sep in r.output for r in runs)
    assert "--seed" in runs[0].args and runs[0].args[runs[0].args.index("--seed") + 1] == "4"
    with pytest.raises(UserError, match="no_such"):
        plan(AblationsConfig(variants="no_such"))
    with pytest.raises(UserError, match="seeds"):
        plan(AblationsConfig(seeds="0,x"))


def test_a_run_is_done_resumed_or_run_again(tmp_path):
    def finish(run, step=2, total=2):
        os.makedirs(os.path.join(run.output, "train_state"), exist_ok=True)
        state = {"step": step, "extra": {"total_steps": total}}
        for name, content in (("config.json", {}), (os.path.join("train_state", "state.json"), state)):
            with open(os.path.join(run.output, name), "w") as f:
                json.dump(content, f)
        os.makedirs(os.path.dirname(run.log), exist_ok=True)
        with open(run.log + ".cmd", "w") as f:
            f.write(run.command())

    runs = {r.label: r for r in plan(AblationsConfig(out=str(tmp_path), seeds="0", variants="no_prompt"))}
    data, cpt, vcp = runs["seed 0 data"], runs["seed 0 cpt full"], runs["seed 0 vcp full"]
    os.makedirs(data.output)
    (tmp_path / "seed0" / "data" / "meta.json").write_text("{}")
    assert ablations.status(data) == "run"                               # no record of its command
    os.makedirs(os.path.dirname(data.log))
    with open(data.log + ".cmd", "w") as f:
        f.write(data.command().replace("OMP_NUM_THREADS=1", "OMP_NUM_THREADS=2"))
    assert ablations.status(data) == "run"                               # made with other threads
    with open(data.log + ".cmd", "w") as f:
        f.write(data.command())
    assert ablations.status(data) == "done"
    assert ablations.status(cpt) == "run"                              # nothing there
    finish(cpt, step=1)
    assert ablations.status(cpt) == "resume"                           # cut short on the same inputs
    finish(cpt)
    assert ablations.status(cpt) == "done"
    finish(vcp)
    assert ablations.status(vcp) == "done"
    past = (time.time() - 100,) * 2
    os.utime(os.path.join(vcp.output, "config.json"), past)              # the data made again after the VCP
    assert ablations.status(vcp) == "run"
    finish(vcp, step=1)
    assert ablations.status(vcp) == "resume"
    os.utime(os.path.join(vcp.output, "train_state", "state.json"), past)   # ... after its checkpoint
    assert ablations.status(vcp) == "run"
    finish(vcp)
    with open(vcp.log + ".cmd", "w") as f:
        f.write(vcp.command().replace("--lr=2e-3", "--lr=1e-3"))       # a recipe value changed in demo.py
    assert ablations.status(vcp) == "run"
    assert ablations.status(runs["seed 0 eval full"]) == "run"


# ============================================================================ the results

def test_reproduced_is_a_gap_of_two_standard_deviations_of_the_per_seed_gaps():
    # gaps 10, 11, 9: mean 10, sd 1
    assert ablations.reproduced([50.0, 52.0, 54.0], [40.0, 41.0, 45.0])
    # gaps 2, 2, 6: mean 3.33, sd 2.31 -> 3.33 < 4.62
    assert not ablations.reproduced([50.0, 52.0, 54.0], [48.0, 50.0, 48.0])
    # the same gap of 5 in every seed: reproduced, although the seeds' scores spread by 10 (unpaired: no)
    assert ablations.reproduced([50.0, 60.0, 70.0], [45.0, 55.0, 65.0])
    assert not ablations.reproduced([50.0], [50.0])                 # equal: no gap
    assert ablations.reproduced([50.0], [49.99])                    # one seed: any gap
    assert not ablations.reproduced([40.0, 41.0], [45.0, 46.0])     # the variant is better


def test_summary_by_hand():
    s = lambda b, r: {"bleu4": b, "rouge": r}  # noqa: E731
    results = ablations.summarize({"full": [s(50, 70), s(52, 72), s(54, 74)],
                                   "no_prompt": [s(40, 60), s(41, 61), s(45, 65)]}, [0, 1, 2])
    full, var = results["full"], results["no_prompt"]
    assert full["bleu4"] == [50, 52, 54] and full["seeds"] == [0, 1, 2]
    assert full["mean"] == {"bleu4": 52, "rouge": 72} and full["sd"] == {"bleu4": 2.0, "rouge": 2.0}
    assert var["mean"]["bleu4"] == 42 and var["sd"]["bleu4"] == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    assert var["delta"] == -10 and full["delta"] == 0
    assert var["delta_sd"] == pytest.approx(1.0)                        # gaps -10, -11, -9
    assert full["reproduced"] is None and var["reproduced"] is True     # 10 > 2 * 1
    assert "Tab. 8 row 4" in var["paper"]
    one = ablations.summarize({"full": [s(50, 70)]}, [0])["full"]
    assert one["sd"] == {"bleu4": 0.0, "rouge": 0.0}
    rows = ablations.table(results).splitlines()
    assert len(rows) == 4 and rows[3].startswith("| no_prompt | 42.00 ± 2.65 | 62.00 ± 2.65 | -10.00 ± 1.00 | yes | 3 |")


# ============================================================================ a whole quick run

def ablate(out, *flags):
    """`python ablations.py --quick=true` into `out`; -> the progress lines {label: what they say}."""
    proc = subprocess.run([sys.executable, "ablations.py", "--quick=true", f"--out={out}", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    return {line.split("] ", 1)[1].split(" ...")[0]: line.split(" ...")[1].strip() for line in lines}


def ran(progress):
    return {label for label, said in progress.items() if said != "(done before)"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations") / "out"
    return out, ablate(out)


@pytest.mark.slow
def test_quick_run_writes_every_variants_results(quick):
    out, progress = quick
    assert len(progress) == 35 and ran(progress) == set(progress)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(VARIANTS) | {"seconds"}
    for name in VARIANTS:
        r = results[name]
        scores = json.loads((out / "seed0" / f"scores_{name}.json").read_text())
        assert r["seeds"] == [0] and r["bleu4"] == [scores["bleu4"]] and r["rouge"] == [scores["rouge"]]
        assert r["mean"]["bleu4"] == scores["bleu4"] and r["sd"] == {"bleu4": 0.0, "rouge": 0.0}
        assert r["delta"] == pytest.approx(scores["bleu4"] - results["full"]["bleu4"][0])
        assert r["reproduced"] is (None if name == "full" else r["delta"] < 0)   # one seed: sd 0
    rows = [line for line in (out / "table.md").read_text().splitlines()[2:] if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(VARIANTS)
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(out / "ablations.png").size[0] > 300
    # the stage folders: each shared stage once
    seed0 = {p.name for p in (out / "seed0").iterdir() if p.is_dir()}
    assert {p for p in seed0 if p.startswith("cpt")} == {"cpt", "cpt_no_pairs"}
    assert len([p for p in seed0 if p.startswith("vcp_")]) == 4
    assert len([p for p in seed0 if p.startswith("vlt_")]) == len([p for p in seed0 if p.startswith("tune_")]) == 9
    corpus = (out / "seed0" / "corpus_no_pairs.jsonl").read_text().splitlines()
    assert corpus and all("gloss" not in json.loads(line) for line in corpus)


@pytest.mark.slow
def test_quick_run_resumes_where_it_stopped(quick):
    out, _ = quick
    seed0 = out / "seed0"
    again = ablate(out)
    assert len(again) == 35 and ran(again) == set()                     # everything done before
    (seed0 / "scores_signcl0.json").unlink()
    assert ran(ablate(out)) == {"seed 0 eval signcl0"}
    # a deleted connector folder: it and what reads it run again; a full-tune cut short continues
    shutil.rmtree(seed0 / "vlt_no_prompt")
    state = seed0 / "tune_linear_connector" / "train_state" / "state.json"
    cut = json.loads(state.read_text())
    cut["step"] = 1
    state.write_text(json.dumps(cut))
    progress = ablate(out)
    assert ran(progress) == {"seed 0 vlt no_prompt", "seed 0 tune no_prompt", "seed 0 eval no_prompt",
                             "seed 0 tune linear_connector", "seed 0 eval linear_connector"}
    assert progress["seed 0 tune linear_connector"].endswith("(resumed)")
    assert json.loads(state.read_text())["step"] == 2


@pytest.mark.slow
def test_two_seeds_are_averaged(quick):
    out, _ = quick
    # seed 1 as if it had run: seed 0's folders (mtimes kept) under the commands of seed 1's plan
    shutil.copytree(out / "seed0", out / "seed1")
    for run in plan(AblationsConfig(out=str(out), seeds="1", quick=True)):
        with open(run.log + ".cmd", "w") as f:
            f.write(run.command())
    full1 = out / "seed1" / "scores_full.json"
    scores = json.loads(full1.read_text())
    scores["bleu4"] = 10.0
    full1.write_text(json.dumps(scores))
    assert ran(ablate(out, "--seeds=0,1")) == set()
    results = json.loads((out / "results.json").read_text())
    b0 = results["no_prompt"]["bleu4"][0]
    assert results["no_prompt"]["bleu4"] == [b0, b0] and results["no_prompt"]["sd"]["bleu4"] == 0
    f0 = json.loads((out / "seed0" / "scores_full.json").read_text())["bleu4"]
    full = results["full"]
    assert full["bleu4"] == [f0, 10.0] and full["seeds"] == [0, 1]
    assert full["mean"]["bleu4"] == pytest.approx((f0 + 10) / 2)
    assert full["sd"]["bleu4"] == pytest.approx(abs(f0 - 10) / math.sqrt(2))
    assert results["no_prompt"]["delta"] == pytest.approx(b0 - (f0 + 10) / 2)
    assert "| 2 |" in (out / "table.md").read_text().splitlines()[2]
