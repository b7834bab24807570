"""`make demo`: the whole trilogy on a synthetic sign language, on a CPU, in minutes.

It runs the same scripts with the same flags a GPU user runs (README), only with tiny values:
    synth.py -> train_cpt.py -> train_vcp.py -> train_vlt.py (connector) -> train_vlt.py
    --full_tune=true -> eval.py on the held-out test split (gloss combinations never seen in
    training), and prints BLEU/ROUGE for the untrained pipeline, the language prior alone
    (text-only: the trained LLM with no visual tokens) and the trained model.
Everything goes under --out (default out/demo); results.json holds the table. Last, after
every number, it draws two pictures (plot.py): curves.png, the four training runs' loss and
learning rate, and examples.png, a few test clips as frame strips with their reference and
the trained and text-only translations.
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
    threads: int = 2                 # torch threads per process (the target machine has 2 cores)
    cpt_steps: int = 150
    vcp_steps: int = 220
    vlt_steps: int = 300
    full_tune_steps: int = 120
    # seconds per stage at most (a slower machine then stops early, still saving); none by
    # default, since a stage cut by the clock gives scores that depend on the machine's load
    stage_time_limit: Optional[float] = None
    fresh: bool = False              # regenerate the data and retrain every stage


def run(title: str, args: list, log_dir: str):
    """One stage as its own process (as a user would run it); its output goes to a log file."""
    print(f"== {title}: {' '.join(os.path.basename(a) if a == PY else a for a in [PY] + args)}", flush=True)
    t0 = time.time()
    log = os.path.join(log_dir, f"{title.replace(' ', '_')}.log")
    with open(log, "w") as f:
        proc = subprocess.run([PY] + args, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read().splitlines()[-15:]
        print("\n".join(tail))
        raise SystemExit(f"demo: {title} failed (exit {proc.returncode}); full log in {log}")
    print(f"   done in {time.time() - t0:.0f} s (log: {log})", flush=True)
    return time.time() - t0


def main(argv):
    config = parse_config(DemoConfig, argv)
    t_start = time.time()
    # fixed, not a default: float sums (and so every score) depend on the number of threads
    os.environ["OMP_NUM_THREADS"] = str(config.threads)
    out = config.out
    data, cpt, vcp, vlt, full = (os.path.join(out, d) for d in ("data", "cpt", "vcp", "vlt", "vlt_full"))
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    limit = f"--time_limit={config.stage_time_limit if config.stage_time_limit else 'none'}"
    seconds = {}

    def done(folder):  # a stage that finished before is not run again (unless --fresh=true)
        return not config.fresh and os.path.isfile(os.path.join(folder, "config.json"))

    if config.fresh or not os.path.isfile(os.path.join(data, "meta.json")):
        seconds["data"] = run("synthetic data", ["synth.py", "--out", data, "--seed", str(config.seed),
                                                 "--n_train", str(config.n_train), "--n_test", str(config.n_test),
                                                 "--overwrite=true"], logs)
    # Stage 1: a tiny Qwen2-shaped LLM and a word-level tokenizer, from scratch, on the corpus
    if not done(cpt):
        seconds["cpt"] = run("stage 1 CPT", [
            "train_cpt.py", f"--corpus={data}/corpus.jsonl", f"--out={cpt}", "--hidden_size=128", "--num_layers=3",
            "--num_heads=4", "--num_kv_heads=2", "--intermediate_size=512", "--gloss_repeat=2", "--block_size=64",
            f"--max_steps={config.cpt_steps}", "--batch_size=64", "--lr=3e-3", "--weight_decay=0.0", "--log_every=50",
            f"--seed={config.seed}", limit], logs)
    # Stage 2: a tiny ViT on 32 px frames ("flat" frame pooling: see README), 1 local + 1 full layer
    if not done(vcp):
        seconds["vcp"] = run("stage 2 VCP", [
            "train_vcp.py", f"--data={data}", f"--text_from_llm={cpt}", f"--out={vcp}", "--image_size=32",
            "--resize=32", "--stride=2", "--max_frames=64", "--cache_videos=true", "--flip=0", "--rotation=0", "--color_jitter=0.1",
            "--frame_pool=flat", "--vit_tuning=full", "--vit_dim=64", "--vit_layers=2", "--vit_heads=4",
            "--patch_size=8", "--dim=128", "--heads=4", "--local_layers=1", "--window=3", "--full_layers=1",
            "--dropout=0.0", "--clip_dim=128", "--logit_scale_init=30", f"--max_steps={config.vcp_steps}",
            "--batch_size=64", "--lr=2e-3", "--weight_decay=1e-5", "--log_every=25", f"--seed={config.seed}",
            "--vit_chunk_size=256", limit], logs)
    # Stage 3: the connector on cached word features, then full-tuning
    if not done(vlt):
        seconds["vlt"] = run("stage 3 VLT connector", [
            "train_vlt.py", f"--data={data}", f"--cpt={cpt}", f"--vcp={vcp}", f"--out={vlt}",
            f"--max_steps={config.vlt_steps}", "--batch_size=64", "--lr=2e-3", "--log_every=50",
            f"--seed={config.seed}", limit], logs)
    if not done(full):
        seconds["full_tune"] = run("stage 3 VLT full-tune", [
            "train_vlt.py", f"--data={data}", f"--init={vlt}", "--full_tune=true", "--lora_r=8", "--lora_alpha=16",
            "--augment=false", "--cache_videos=true", f"--out={full}", f"--max_steps={config.full_tune_steps}",
            "--batch_size=32", "--lr=3e-4", "--log_every=50", f"--seed={config.seed}", limit], logs)

    results = {}
    rows = [("untrained", full, ["--untrained=true"]), ("text_only", full, ["--text_only=true"]),
            ("connector_only", vlt, []), ("test", full, [])]
    for name, ckpt, extra in rows:
        path = os.path.join(out, f"scores_{name}.json")
        run(f"eval {name}", ["eval.py", f"--checkpoint={ckpt}", f"--data={data}", "--split=test", "--num_beams=4",
                             f"--json={path}", f"--predictions={os.path.join(out, f'predictions_{name}.jsonl')}",
                             "--batch_size=50", "--max_new_tokens=32"] + extra, logs)
        with open(path) as f:
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
