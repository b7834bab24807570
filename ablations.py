"""`make ablations`: the paper's ablations on the synthetic language, over several seeds (off
the reading path: a driver of the scripts, like demo.py).

    python ablations.py --out=out/ablations [--seeds=0,1,2] [--variants=no_local,signcl0] [--quick=true]

Every variant is the demo's recipe (the flag lists of demo.py: synth_args, cpt_args, vcp_args,
vlt_args, full_tune_args, eval_args) with one change, scored like the demo's "test" row (the
held-out test split, beam 4). A seed seeds the data and every stage. What a variant shares with
the full recipe is trained once per seed and serves every variant that shares it:

    OUT/seed{s}/data            synth.py --seed s (one per seed)
    OUT/seed{s}/cpt             CPT
    OUT/seed{s}/cpt_no_pairs    CPT on corpus_no_pairs.jsonl (the corpus without its gloss-text pairs)
    OUT/seed{s}/vcp_{v}         VCP of the full recipe (v = full) and of each variant that changes VCP
    OUT/seed{s}/vlt_{v}         the connector stage; features_{v}/ its word-feature cache (one per VCP)
    OUT/seed{s}/tune_{v}        full-tuning from vlt_{v}
    OUT/seed{s}/scores_{v}.json eval.py's scores (predictions_{v}.jsonl beside them), logs/ every run's output

Runs go two at a time (--cores), each with one thread, as soon as the runs they read are
complete, earlier stages first: one thread a run does more work on two cores than two threads do.

Then OUT/results.json (per variant: the seeds' BLEU-4 and ROUGE-L, mean, sd, delta against the
full recipe with the sd of the per-seed deltas, whether the paper's claim is reproduced),
OUT/table.md and OUT/ablations.png.

Like `make`, a run whose output is complete, newer than its inputs and made by the same command
(flags and threads, recorded in logs/*.cmd) is not run again. So an interrupted `make ablations`
continues where it stopped: a training run cut short (killed, or stopped by --stage_time_limit)
continues from its last checkpoint (--resume=true); and after a change to the recipe in demo.py
or a deleted folder, exactly the runs it changes, and those that read them, run again (from the
start).
"""

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cli import cli, parse_config
from demo import (DemoConfig, check_stage, cpt_args, eval_args, full_tune_args, start_stage, synth_args, vcp_args,
                  vlt_args)
from errors import UserError


@dataclass
class AblationsConfig:
    out: str = "out/ablations"
    seeds: Optional[str] = field(default=None, metadata={"help": "comma-separated; none: 0,1,2 (0 with --quick)"})
    variants: str = field(default="", metadata={"help": "comma-separated subset (full always runs); '': all"})
    quick: bool = False              # tiny data and 2 steps per stage (the tests): checks the code paths only
    cores: int = DemoConfig.threads  # runs side by side, one torch thread each
    stage_time_limit: Optional[float] = None   # as demo.py's: off, since it makes scores depend on the machine


@dataclass(frozen=True)
class Variant:
    paper: str                       # what the paper reports for it
    pairs: bool = True               # False: CPT on the corpus without its gloss-text pairs
    vcp: tuple = ()                  # flags added to VCP (a VCP of its own)
    vlt: tuple = ()                  # flags added to both VLT stages, connector and full-tune
    full_tune: bool = True           # False: the connector folder is evaluated


# Each variant changes one thing of the full recipe; the stages it does not change are the full recipe's.
VARIANTS = {
    "full": Variant("the full recipe: every delta is against it"),
    "no_local": Variant("Tab. 7: lower without the local attention (frame features into the full-attention one)",
                        vcp=("--local_layers=0", "--step=1")),
    "linear_connector": Variant("Tab. 8 row 2: a linear connector scores below the 2-layer MLP",
                                vlt=("--connector=linear",)),
    "sentence_tokens": Variant("Tab. 8 row 1: sentence-level tokens score below word-level ones",
                               vlt=("--visual_tokens=sentence",)),
    "no_format_prompt": Variant("Tab. 8 row 3: lower without the format prompt", vlt=("--prompt=no_format",)),
    "no_prompt": Variant("Tab. 8 row 4: lower again without the task prompt", vlt=("--prompt=none",)),
    "connector_only": Variant("Tab. 8 row 5: lower without full-tuning", full_tune=False),
    "no_vcp": Variant("3.2 (no table): an untrained visual encoder should score far lower",
                      vcp=("--max_steps=1", "--lr=1e-8")),
    "cpt_no_pairs": Variant("3.1 (no table): CPT's gloss-text pairs should help", pairs=False),
    "signcl0": Variant("SignCL paper: lower without SignCL (LLaVA-SLT weights it 1e-2)", vcp=("--signcl_weight=0",)),
}

# --quick=true: a tiny language and 2 steps per stage (every code path, in seconds); the flags are
# appended to the recipe's, so they win
QUICK = dict(n_train=48, n_test=8, cpt_steps=2, vcp_steps=2, vlt_steps=2, full_tune_steps=2)
QUICK_FLAGS = {"data": ["--n_dev=4", "--n_corpus=200"], "cpt": ["--batch_size=8"],
               "vcp": ["--batch_size=8", "--max_frames=16"], "vlt": ["--batch_size=8"], "tune": ["--batch_size=8"],
               "eval": ["--max_new_tokens=8"]}
STAGES = ("data", "cpt", "vcp", "vlt", "tune", "eval")
TRAINING = STAGES[1:5]
THREADS = 1                          # per run (part of its command: a float sum, and so a score, depends on it)


@dataclass
class Run:
    seed: int
    stage: str                       # data | cpt | vcp | vlt | tune | eval
    name: str                        # the variant whose folder it is ("full": the shared one)
    args: list                       # the script and its flags (without --resume)
    output: str                      # the folder it writes (eval: its scores json)
    inputs: tuple = ()               # the runs whose outputs it reads
    before: Optional[Callable] = None   # called before it runs (writes a file it reads)

    @property
    def label(self) -> str:
        return f"seed {self.seed} {self.stage}" + (f" {self.name}" if self.name else "")

    @property
    def log(self) -> str:
        """Its output goes to LOG.log; LOG.cmd records the command it ran with (the flags and the threads)."""
        return os.path.join(os.path.dirname(self.output), "logs", self.stage + (f"_{self.name}" if self.name else ""))

    def command(self) -> str:
        return f"OMP_NUM_THREADS={THREADS} python " + " ".join(self.args)


# ----------------------------------------------------------------------------- the plan

def parse_list(text: str, what: str, valid=None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if valid is not None and t not in valid]
    if bad or not items:
        raise UserError(f"--{what}={text}: expected a comma-separated list" +
                        (f" of {', '.join(valid)}" if valid is not None else ""))
    return list(dict.fromkeys(items))


def seeds_of(config: AblationsConfig) -> list:
    text = config.seeds if config.seeds is not None else ("0" if config.quick else "0,1,2")
    try:
        return [int(s) for s in parse_list(text, "seeds")]
    except ValueError:
        raise UserError(f"--seeds={text}: expected whole numbers, e.g. --seeds=0,1,2") from None


def variants_of(config: AblationsConfig) -> list:
    """The variants to run, in VARIANTS' order; the full recipe always (every delta needs it)."""
    chosen = set(parse_list(config.variants, "variants", VARIANTS)) if config.variants else set(VARIANTS)
    return [name for name in VARIANTS if name == "full" or name in chosen]


def drop_pairs(corpus: str, out: str):
    """A copy of the CPT corpus without its gloss-text pairs (the rows that carry "gloss")."""
    with open(corpus, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and "gloss" not in json.loads(line)]
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(rows)
    os.replace(out + ".tmp", out)


def plan(config: AblationsConfig) -> list:
    """Every run, in order; a stage that several variants share is one run (keyed by its folder)."""
    runs = {}

    def add(seed, stage, name, output, args, extra=(), inputs=(), before=None) -> Run:
        """The run that writes `output` (the one planned before, when a variant shares it): the
        recipe's `args`, then the --quick flags, then the variant's `extra` flags (the last wins)."""
        quick = QUICK_FLAGS[stage] if config.quick else []
        run = Run(seed, stage, name, args + quick + list(extra), output, tuple(inputs), before)
        return runs.setdefault(output, run)

    for seed in seeds_of(config):
        recipe = DemoConfig(seed=seed, stage_time_limit=config.stage_time_limit)
        recipe = dataclasses.replace(recipe, **QUICK) if config.quick else recipe
        path = functools.partial(os.path.join, config.out, f"seed{seed}")
        data = add(seed, "data", "", path("data"), synth_args(recipe, path("data")))
        corpus = os.path.join(data.output, "corpus.jsonl")
        full_cpt = add(seed, "cpt", "full", path("cpt"), cpt_args(recipe, corpus, path("cpt")), inputs=[data])
        for name in variants_of(config):
            v = VARIANTS[name]
            # a stage is the variant's own when the variant changes it or a stage before it
            own_vcp = name if v.vcp else "full"
            own_vlt = name if (v.vcp or v.vlt or not v.pairs) else "full"
            cpt = full_cpt
            if not v.pairs:
                no_pairs = path("corpus_no_pairs.jsonl")
                cpt = add(seed, "cpt", name, path("cpt_no_pairs"), cpt_args(recipe, no_pairs, path("cpt_no_pairs")),
                          inputs=[data], before=functools.partial(drop_pairs, corpus, no_pairs))
            out = path(f"vcp_{own_vcp}")
            vcp = add(seed, "vcp", own_vcp, out, vcp_args(recipe, data.output, out), v.vcp, [data])
            out, cache = path(f"vlt_{own_vlt}"), path(f"features_{own_vcp}")   # word features: one set per VCP
            vlt = add(seed, "vlt", own_vlt, out, vlt_args(recipe, data.output, cpt.output, vcp.output, out),
                      [*v.vlt, f"--cache={cache}"], [data, cpt, vcp])
            checkpoint = vlt
            if v.full_tune:
                out = path(f"tune_{own_vlt}")
                checkpoint = add(seed, "tune", own_vlt, out, full_tune_args(recipe, data.output, vlt.output, out),
                                 v.vlt, [data, vlt])
            scores, predictions = path(f"scores_{name}.json"), path(f"predictions_{name}.jsonl")
            add(seed, "eval", name, scores, eval_args(checkpoint.output, data.output, scores, predictions),
                [f"--seed={seed}"], [data, checkpoint])
    return list(runs.values())


# ----------------------------------------------------------------------------- done, resume or run

def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stamp(run: Run) -> Optional[float]:
    """When `run` completed its output (the mtime of the file written last), None if it has not:
    data: meta.json; training: config.json, with train_state/ at its last step; eval: the scores."""
    if run.stage == "eval":
        return os.path.getmtime(run.output) if "bleu4" in (_read_json(run.output) or {}) else None
    marker = os.path.join(run.output, "meta.json" if run.stage == "data" else "config.json")
    if not os.path.isfile(marker):
        return None
    state = _read_json(os.path.join(run.output, "train_state", "state.json")) or {}
    if state.get("step", 0) < state.get("extra", {}).get("total_steps", 0):
        return None                  # a checkpoint saved mid-run (--save_every_minutes, a time limit)
    return os.path.getmtime(marker)


def status(run: Run) -> str:
    """done: complete, with the same command, newer than its inputs | resume: a training run cut
    short, same command, same inputs (continue from its checkpoint) | run: from the start,
    replacing what is there (new, changed flags or threads, or an input made again)."""
    try:
        with open(run.log + ".cmd") as f:
            if f.read() != run.command():
                return "run"
    except OSError:
        return "run"
    inputs = [stamp(i) for i in run.inputs]
    newest = max((math.inf if t is None else t for t in inputs), default=0.0)
    finished = stamp(run)
    if finished is not None and finished >= newest:
        return "done"
    state = os.path.join(run.output, "train_state", "state.json")
    if run.stage in TRAINING and finished is None and os.path.isfile(state) and os.path.getmtime(state) >= newest:
        return "resume"
    return "run"


# ----------------------------------------------------------------------------- results

def mean_sd(values: list) -> tuple:
    """Mean and sample standard deviation (ddof 1; 0 for one seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def reproduced(full: list, variant: list) -> bool:
    """The paper's claim (the variant is worse) holds when the variant's BLEU-4 falls below the full
    recipe's by more than two standard deviations of the per-seed differences. Paired by seed: a
    seed's variant shares that seed's data and earlier stages with its full recipe, so the spread
    that matters is that of the gaps, not of the scores (one seed: any gap). full, variant: per seed."""
    gap, sd = mean_sd([f - v for f, v in zip(full, variant)])
    return gap > 2 * sd


def summarize(scores: dict, seeds: list) -> dict:
    """{variant: [eval scores per seed]} -> results.json's entry per variant."""
    results = {}
    for name, per_seed in scores.items():
        bleu, rouge = [s["bleu4"] for s in per_seed], [s["rouge"] for s in per_seed]
        (b_mean, b_sd), (r_mean, r_sd) = mean_sd(bleu), mean_sd(rouge)
        results[name] = {"seeds": seeds, "bleu4": bleu, "rouge": rouge, "mean": {"bleu4": b_mean, "rouge": r_mean},
                         "sd": {"bleu4": b_sd, "rouge": r_sd}, "paper": VARIANTS[name].paper}
    full = results["full"]
    for name, r in results.items():
        r["delta"], r["delta_sd"] = mean_sd([v - f for v, f in zip(r["bleu4"], full["bleu4"])])
        r["reproduced"] = None if name == "full" else reproduced(full["bleu4"], r["bleu4"])
    return results


def table(results: dict) -> str:
    """One row per variant: BLEU-4 and ROUGE-L as mean ± sd over the seeds, the delta (mean ± sd of
    the per-seed differences), the verdict."""
    lines = ["| variant | BLEU-4 | ROUGE-L | delta BLEU-4 | reproduced | seeds | paper |", "|---" * 7 + "|"]
    for name, r in results.items():
        yes = {None: "-", True: "yes", False: "no"}[r["reproduced"]]
        delta = "-" if name == "full" else f"{r['delta']:+.2f} ± {r['delta_sd']:.2f}"
        lines.append(f"| {name} | {r['mean']['bleu4']:.2f} ± {r['sd']['bleu4']:.2f} | {r['mean']['rouge']:.2f} ± "
                     f"{r['sd']['rouge']:.2f} | {delta} | {yes} | {len(r['seeds'])} | {r['paper']} |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, out_png: str) -> Figure:
    """BLEU-4 mean per variant with the seeds' sd as error bars; the full recipe highlighted."""
    names = list(results)
    means, sds = [results[n]["mean"]["bleu4"] for n in names], [results[n]["sd"]["bleu4"] for n in names]
    fig = Figure(figsize=(1.0 + 0.8 * len(names), 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), means, yerr=sds, capsize=4,
           color=["tab:orange" if n == "full" else "tab:blue" for n in names])
    ax.axhline(results["full"]["mean"]["bleu4"], color="tab:orange", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("BLEU-4 (held-out test split)")
    ax.set_title(f"ablations: mean ± sd over {len(results['full']['seeds'])} seed(s); full recipe in orange",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out_png)
    return fig


# ----------------------------------------------------------------------------- main

def execute(runs: list, cores: int):
    """Every run not done before, `cores` at a time, each as soon as the runs it reads are complete:
    earlier stages first (the runs that many wait for; so the last minutes are short runs side by
    side, not one long one alone), then the plan's order. A progress line as each ends; a failure
    stops the others (they resume)."""
    waiting, running, complete, width, ended = list(runs), [], set(), len(str(len(runs))), 0
    try:
        while waiting or running:
            ready = [r for r in waiting if all(i.output in complete for i in r.inputs)]
            for run in sorted(ready, key=lambda r: STAGES.index(r.stage)):
                if len(running) == cores:
                    break
                waiting.remove(run)
                state = status(run)
                if state == "done":
                    ended += 1
                    print(f"[{ended:{width}d}/{len(runs)}] {run.label} ... (done before)", flush=True)
                    complete.add(run.output)
                    continue
                os.makedirs(os.path.dirname(run.log), exist_ok=True)
                with open(run.log + ".cmd", "w") as f:
                    f.write(run.command())
                if run.before is not None:
                    run.before()
                args = run.args + (["--resume=true"] if state == "resume" else [])
                running.append((run, start_stage(args, run.log + ".log", THREADS), time.time(), state))
            for item in [item for item in running if item[1].poll() is not None]:
                run, proc, t0, state = item
                check_stage(proc, run.log + ".log", f"ablations: {run.label}")
                running.remove(item)
                complete.add(run.output)
                ended += 1
                print(f"[{ended:{width}d}/{len(runs)}] {run.label} ... done in {time.time() - t0:.0f} s"
                      + (" (resumed)" if state == "resume" else ""), flush=True)
            time.sleep(0.1)
    finally:
        for _, proc, _, _ in running:
            proc.terminate()


def main(argv):
    config = parse_config(AblationsConfig, argv)
    t_start = time.time()
    execute(plan(config), config.cores)

    seeds = seeds_of(config)
    scores = {name: [_read_json(os.path.join(config.out, f"seed{s}", f"scores_{name}.json")) for s in seeds]
              for name in variants_of(config)}
    results = summarize(scores, seeds)
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump({**results, "seconds": round(time.time() - t_start, 1)}, f, indent=2)
    with open(os.path.join(config.out, "table.md"), "w") as f:
        f.write(table(results))
    bar_chart(results, os.path.join(config.out, "ablations.png"))
    print("\n" + table(results))
    print(f"{time.time() - t_start:.0f} s in all; {config.out}/results.json, table.md, ablations.png")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
