"""`make demo`: the whole trilogy on a synthetic sign language, on a CPU, in minutes.

It runs the same scripts with the same flags a GPU user runs (README), only with tiny values:
    synth.py -> train_cpt.py and train_vcp.py side by side -> train_vlt.py (connector) ->
    train_vlt.py --full_tune=true -> eval.py on the held-out test split (gloss combinations never
    seen in training), and prints BLEU/ROUGE for the untrained pipeline, the language prior alone
    (text-only: the trained LLM with no visual tokens) and the trained model.
Everything goes under --out (default out/demo); results.json holds the table. Last, after
every number, it draws two pictures (plot.py): curves.png, the four training runs' loss and
learning rate, and examples.png, a few test clips as frame strips with their reference and
the trained and text-only translations.
The recipe (every stage's flags) is written once, in the functions below DemoConfig;
ablations.py (`make ablations`) runs the same recipe with one change per variant.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import plot
from cli import cli, parse_config

PY = sys.executable


@dataclass
class DemoConfig:
    out: str = "out/demo"
    seed: int = 0
    n_train: int = 3000
    n_test: int = 300
    threads: int = 2                 # cores (the target machine has 2): a VLT stage's torch threads; CPT and VCP
                                     # side by side, and the evaluations two at a time, have half each
    cpt_steps: int = 320
    vcp_steps: int = 220
    vlt_steps: int = 560
    full_tune_steps: int = 60
    # seconds per stage at most (a slower machine then stops early, still saving); none by
    # default, since a stage cut by the clock gives scores that depend on the machine's load
    stage_time_limit: Optional[float] = None
    fresh: bool = False              # regenerate the data and retrain every stage


# ----------------------------------------------------------------------------- the recipe
# Each function returns one stage's command line (script and flags); `config` is a DemoConfig
# (seed, data counts, steps, time limit). The demo and ablations.py both run these lists.

def _limit(config: DemoConfig) -> str:
    return f"--time_limit={config.stage_time_limit if config.stage_time_limit else 'none'}"


def synth_args(config: DemoConfig, data: str) -> list:
    return ["synth.py", "--out", data, "--seed", str(config.seed), "--n_train", str(config.n_train),
            "--n_test", str(config.n_test), "--video_format=npy", "--overwrite=true"]


def cpt_args(config: DemoConfig, corpus: str, out: str) -> list:
    """Stage 1: a tiny Qwen2-shaped LLM and a word-level tokenizer, from scratch, on the corpus."""
    return ["train_cpt.py", f"--corpus={corpus}", f"--out={out}", "--hidden_size=128", "--num_layers=3",
            "--num_heads=4", "--num_kv_heads=2", "--intermediate_size=512", "--gloss_repeat=2", "--block_size=52",
            f"--max_steps={config.cpt_steps}", "--batch_size=64", "--lr=3e-3", "--weight_decay=0.0", "--log_every=50",
            f"--seed={config.seed}", _limit(config)]


def vcp_args(config: DemoConfig, data: str, out: str) -> list:
    """Stage 2: a tiny ViT on 32 px frames ("flat" frame pooling: see README), 1 local + 2 full layers
    (2: the sentence-level ablation takes the penultimate one, which must see the whole clip);
    the teacher a bag of random word vectors (the CPT LLM's embeddings merge the minimal pairs: README),
    so VCP needs no CPT and the two run side by side."""
    return ["train_vcp.py", f"--data={data}", "--text_from_words=128", f"--out={out}", "--image_size=32",
            "--resize=32", "--stride=3", "--max_frames=64", "--cache_videos=true", "--flip=0", "--rotation=0",
            "--color_jitter=0.1", "--frame_pool=flat", "--vit_tuning=full", "--vit_dim=64", "--vit_layers=2",
            "--vit_heads=4", "--patch_size=8", "--dim=128", "--heads=4", "--local_layers=1", "--window=3",
            "--full_layers=2", "--dropout=0.0", "--clip_dim=128", "--logit_scale_init=30",
            f"--max_steps={config.vcp_steps}", "--batch_size=64", "--lr=2e-3", "--weight_decay=1e-5", "--log_every=25",
            f"--seed={config.seed}", "--vit_chunk_size=256", _limit(config)]


def vlt_args(config: DemoConfig, data: str, cpt: str, vcp: str, out: str) -> list:
    """Stage 3a: the connector, on cached word features."""
    return ["train_vlt.py", f"--data={data}", f"--cpt={cpt}", f"--vcp={vcp}", f"--out={out}",
            f"--max_steps={config.vlt_steps}", "--batch_size=64", "--lr=5e-3", "--log_every=50",
            f"--seed={config.seed}", _limit(config)]


def full_tune_args(config: DemoConfig, data: str, init: str, out: str) -> list:
    """Stage 3b: full-tuning from the connector folder (LoRA on the LLM, the encoder unfrozen)."""
    return ["train_vlt.py", f"--data={data}", f"--init={init}", "--full_tune=true", "--lora_r=8", "--lora_alpha=16",
            "--augment=false", "--cache_videos=true", f"--out={out}", f"--max_steps={config.full_tune_steps}",
            "--batch_size=32", "--lr=3e-4", "--log_every=50", f"--seed={config.seed}", _limit(config)]


def eval_args(checkpoint: str, data: str, scores: str, predictions: str) -> list:
    """The held-out test split, beam 4; scores into `scores` (json), translations into `predictions`."""
    return ["eval.py", f"--checkpoint={checkpoint}", f"--data={data}", "--split=test", "--num_beams=4",
            f"--json={scores}", f"--predictions={predictions}", "--batch_size=50", "--max_new_tokens=32"]


def start_stage(args: list, log: str, threads: int) -> subprocess.Popen:
    """One stage as its own process (as a user would run it) with `threads` torch threads, its
    output into the file `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([PY] + args, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def check_stage(proc: subprocess.Popen, log: str, name: str):
    """A stage that failed prints its log's tail and stops the program."""
    if proc.wait() != 0:
        with open(log) as f:
            tail = f.read().splitlines()[-15:]
        print("\n".join(tail))
        raise SystemExit(f"{name} failed (exit {proc.returncode}); full log in {log}")


# ----------------------------------------------------------------------------- the demo

def run(stages: dict, log_dir: str, threads: int) -> dict:
    """Stages {key: (title, args)} side by side, each its own process with `threads` threads (a
    float sum, and so every score, depends on the thread count: it is part of the recipe);
    returns {key: seconds}."""
    procs, seconds = {}, {}
    for key, (title, args) in stages.items():
        print(f"== {title}: {' '.join(os.path.basename(a) if a == PY else a for a in [PY] + args)}", flush=True)
        log = os.path.join(log_dir, f"{title.replace(' ', '_')}.log")
        procs[key] = (title, start_stage(args, log, threads), log, time.time())
    while len(seconds) < len(procs):
        for key, (title, proc, log, t0) in procs.items():
            if key not in seconds and proc.poll() is not None:
                check_stage(proc, log, f"demo: {title}")
                seconds[key] = time.time() - t0
                print(f"   {title}: done in {seconds[key]:.0f} s (log: {log})", flush=True)
        time.sleep(0.1)
    return seconds


def main(argv):
    config = parse_config(DemoConfig, argv)
    t_start = time.time()
    out = config.out
    data, cpt, vcp, vlt, full = (os.path.join(out, d) for d in ("data", "cpt", "vcp", "vlt", "vlt_full"))
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    seconds = {}

    def done(folder):  # a stage that finished before is not run again (unless --fresh=true)
        return not config.fresh and os.path.isfile(os.path.join(folder, "config.json"))

    # CPT and VCP read nothing of each other (in the paper too): side by side, one core each;
    # each VLT stage has every core; the four evaluations go two at a time, one core each
    half = max(1, config.threads // 2)
    if config.fresh or not os.path.isfile(os.path.join(data, "meta.json")):
        seconds.update(run({"data": ("synthetic data", synth_args(config, data))}, logs, config.threads))
    first = {"cpt": ("stage 1 CPT", cpt_args(config, f"{data}/corpus.jsonl", cpt), cpt),
             "vcp": ("stage 2 VCP", vcp_args(config, data, vcp), vcp)}
    seconds.update(run({key: (title, args) for key, (title, args, folder) in first.items() if not done(folder)},
                       logs, half))
    if not done(vlt):
        seconds.update(run({"vlt": ("stage 3 VLT connector", vlt_args(config, data, cpt, vcp, vlt))}, logs,
                           config.threads))
    if not done(full):
        seconds.update(run({"full_tune": ("stage 3 VLT full-tune", full_tune_args(config, data, vlt, full))}, logs,
                           config.threads))

    rows = {"untrained": (full, ["--untrained=true"]), "text_only": (full, ["--text_only=true"]),
            "connector_only": (vlt, []), "test": (full, [])}
    names = list(rows)
    for pair in (names[:2], names[2:]):
        run({name: (f"eval {name}", eval_args(rows[name][0], data, os.path.join(out, f"scores_{name}.json"),
                                              os.path.join(out, f"predictions_{name}.jsonl")) + rows[name][1])
             for name in pair}, logs, half)
    results = {}
    for name in names:
        with open(os.path.join(out, f"scores_{name}.json")) as f:
            results[name] = json.load(f)
    results["seconds"] = round(time.time() - t_start, 1)
    results["stage_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    labels = {"untrained": "untrained", "text_only": "text-only (LLM prior)",
              "connector_only": "trained, connector only", "test": "trained (+ full-tune)"}
    print(f"\nheld-out test split ({config.n_test} clips, unseen gloss combinations), beam 4:")
    print(f"{'':26} {'BLEU1':>6} {'BLEU2':>6} {'BLEU3':>6} {'BLEU4':>6} {'ROUGE':>6}")
    for name, label in labels.items():
        r = results[name]
        print(f"{label:26} " + " ".join(f"{r[k]:6.2f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge")))
    print(f"\n{results['seconds']:.0f} s in all; {os.path.join(out, 'results.json')}")

    # pictures last: drawing reads what the stages and eval wrote and changes none of it
    curves_png, examples_png = os.path.join(out, "curves.png"), os.path.join(out, "examples.png")
    plot.curves([cpt, vcp, vlt, full], curves_png)
    plot.examples(data, {labels["test"]: os.path.join(out, "predictions_test.jsonl"),
                         labels["text_only"]: os.path.join(out, "predictions_text_only.jsonl")}, examples_png)
    print(f"pictures: {curves_png} (training curves), {examples_png} (test clips and their translations)")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
