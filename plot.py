"""Pictures of a run (off the reading path: a helper a reader can skip).

    python plot.py --runs out/demo/cpt out/demo/vcp out/demo/vlt out/demo/vlt_full --out curves.png

`curves` draws the training curves of one or more runs (their `metrics.jsonl`): the training
loss, the learning rate and every dev metric the runs logged, one panel each, the runs
overlaid. `examples` draws a few held-out clips as frame strips with the reference and each
model's translation under them (`make demo` writes both into out/demo/). Only the Agg
backend is used (no window, no pyplot state); the training scripts never import this file.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from errors import DataError, MissingFileError, UserError
from readers import load_rows, read_video

DPI = 100
# Panel titles of the quantities training.fit logs (any other dev_* key is drawn under its name)
TITLES = {"loss": "training loss (each stage its own)", "lr": "learning rate", "dev_loss": "dev CLIP loss (VCP)",
          "dev_r1": "dev video-to-text recall@1 (VCP)", "dev_bleu4": "dev BLEU-4 (VLT)",
          "dev_rouge": "dev ROUGE-L (VLT)"}


def read_metrics(run_folder) -> list:
    """The rows of RUN/metrics.jsonl; a missing, empty or malformed file is one line naming it."""
    path = os.path.join(run_folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: not found; give the --out folder of a training run "
                               "(train_cpt.py, train_vcp.py and train_vlt.py write metrics.jsonl there)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {n}: bad json ({e.msg})") from None
    if not any("step" in r and "loss" in r for r in rows):
        raise DataError(f"{path}: no training rows yet (a run logs one every --log_every steps)")
    return rows


def curves(run_folders, out_png, labels=None) -> Figure:
    """One panel per quantity (loss, lr, each dev metric present), x = step, one line per run
    that has it; written to `out_png` and returned (tests read the lines back)."""
    labels = labels or [os.path.basename(os.path.normpath(r)) for r in run_folders]
    if len(labels) != len(run_folders):
        raise UserError(f"{len(labels)} labels for {len(run_folders)} runs; give one label per run")
    runs = [read_metrics(r) for r in run_folders]
    # training rows carry "loss"; validation rows carry the dev_* scores (a separate row each)
    dev = list(dict.fromkeys(k for rows in runs for r in rows for k in r if k.startswith("dev_")))  # first-logged order
    quantities = ["loss", "lr"] + dev
    cols = 2 if len(quantities) == 4 else min(3, len(quantities))
    rows_ = math.ceil(len(quantities) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows_), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for i, q in enumerate(quantities):
        ax = fig.add_subplot(rows_, cols, i + 1)
        for label, rows in zip(labels, runs):
            points = [(r["step"], r[q]) for r in rows if q in r and "step" in r]
            if points:
                x, y = zip(*points)
                # dev rows are few (every --eval_every steps): mark each one
                ax.plot(x, y, marker="o" if q.startswith("dev_") else None, markersize=3, label=label)
        if q == "lr":
            ax.set_yscale("log")  # the stages' peaks differ by 10x; a linear axis flattens the small ones
        ax.set_title(TITLES.get(q, q), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out_png, dpi=DPI)
    return fig


def _predictions(path) -> dict:
    """{clip id: hypothesis} of an eval.py predictions jsonl."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: predictions not found; eval.py --predictions=... writes them")
    with open(path, encoding="utf-8") as f:
        return {r["id"]: r["hypothesis"] for r in map(json.loads, filter(str.strip, f))}


def _reversed_glosses(data_dir) -> dict:
    """{gloss: the gloss it plays backwards} from synth.py's meta.json ({} for real data)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {g["gloss"]: g["reverse_of"] for g in json.load(f).get("glosses", []) if g.get("reverse_of")}


def pick_clips(rows, reverse_of: dict, n: int) -> list:
    """The first n clips in test order, one of them holding a reversed gloss (a minimal pair,
    told apart only by frame order: what the local attention is for), deterministically."""
    chosen = rows[:n]
    has_pair = lambda r: any(g in reverse_of for g in (r.get("gloss") or "").split())
    if reverse_of and chosen and not any(map(has_pair, chosen)):
        pair = next((r for r in rows[n:] if has_pair(r)), None)
        if pair is not None:
            chosen = chosen[:-1] + [pair]
    return chosen


def _strip(frames: np.ndarray, gap: int = 2) -> np.ndarray:
    """Frames side by side with a white gap: one image per clip."""
    t, h, w, _ = frames.shape
    out = np.full((h, t * (w + gap) - gap, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        out[:, i * (w + gap):i * (w + gap) + w] = f
    return out


def examples(data_dir, predictions: dict, out_png, n: int = 4, every: int = 4, split: str = "test") -> Figure:
    """A frame strip (every `every`-th frame) of n held-out clips, with the glosses, the
    reference and each labelled model's translation ({label: predictions jsonl}) under it."""
    if n < 1 or every < 1:
        raise UserError(f"examples: n={n}, every={every}; give n >= 1 and every >= 1")
    hyps = {label: _predictions(path) for label, path in predictions.items()}
    reverse_of = _reversed_glosses(data_dir)
    clips = pick_clips(load_rows(data_dir, split), reverse_of, n)
    captions = []                                          # per clip: [(line, colour)]
    for row in clips:
        glosses = (row.get("gloss") or "").split()
        marked = " ".join(g + "*" if g in reverse_of else g for g in glosses)
        lines = [(f"{row['id']}   glosses: {marked or '(none given)'}", "dimgray")]
        if any(g in reverse_of for g in glosses):        # its own line: a clip can hold five of them
            lines.append(("played backwards: " + ", ".join(f"{g}* = {reverse_of[g]}" for g in glosses
                                                           if g in reverse_of), "dimgray"))
        lines.append((f"reference: {row['text']}", "black"))
        for label, by_id in hyps.items():
            if row["id"] not in by_id:
                raise DataError(f"{predictions[label]}: no prediction for clip {row['id']}; "
                                f"run eval.py on the {split} split of {data_dir}")
            lines.append((f"{label}: {by_id[row['id']]}", "tab:blue"))
        captions.append(lines)
    strips = [_strip(read_video(r["video"], sample=lambda t: range(0, t, every))) for r in clips]
    title_in, strip_in, line_in, pad_in, width = 0.45, 0.8, 0.22, 0.25, 11.0  # inches
    # one scale (inches per pixel) for every strip, so a frame has the same size in every row
    scale = min(0.98 * width / max(s.shape[1] for s in strips), strip_in / max(s.shape[0] for s in strips))
    height = title_in + sum(s.shape[0] * scale + len(c) * line_in + pad_in for s, c in zip(strips, captions))
    height = math.ceil(height * DPI) / DPI                 # whole pixels: the PNG is exactly the figure
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    title = f"held-out {split} clips, one frame in {every}"
    if reverse_of:
        title += "; a gloss marked * is another gloss played backwards (only frame order tells them apart)"
    fig.text(0.01, 1 - 0.2 / height, title, fontsize=10, weight="bold", va="center")
    top = title_in                                         # inches from the figure's top
    for strip, lines in zip(strips, captions):
        h, w = strip.shape[0] * scale, strip.shape[1] * scale
        ax = fig.add_axes((0.01, 1 - (top + h) / height, w / width, h / height))
        ax.imshow(strip)
        ax.axis("off")
        top += h
        for text, colour in lines:
            fig.text(0.01, 1 - (top + 0.6 * line_in) / height, text, fontsize=9, color=colour, va="center")
            top += line_in
        top += pad_in
    fig.savefig(out_png, dpi=DPI)
    return fig


def main(argv):
    p = argparse.ArgumentParser(description="Training curves of one or more runs into one PNG.")
    p.add_argument("--runs", nargs="+", required=True, help="run folders (the --out of train_*.py)")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    args = p.parse_args(argv)
    curves(args.runs, args.out, args.labels)
    print(f"curves: {args.out}")


if __name__ == "__main__":
    from cli import cli  # a user error (a missing metrics.jsonl) is one line
    cli(main, sys.argv[1:])
