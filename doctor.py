"""The dataset doctor (off the reading path: it checks data before a run, it is not the method).

    python data.py check --data=ROOT [--max_frames=256] [--decode=true]

Reads every split of a manifest folder ({train,dev,test}.jsonl, or one .jsonl), a
Phoenix-2014T root or a CSL-Daily root and prints, per split: the rows (beside the published
counts for Phoenix-2014T and CSL-Daily), every missing, empty or unreadable frame folder or
video, every empty sentence (a count and the first 20 names each), frames per clip, clips
longer than --max_frames, the vocabulary and the sentence lengths (words; characters for
Chinese). Training's readers stop at the first bad row or clip; the doctor collects them all.
Exit status 1 when anything would stop training (missing, empty or unreadable media, empty
sentences, bad rows, an unreadable manifest), else 0.
"""

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import av
from tqdm import tqdm

import readers
from cli import cli, parse_config
from errors import DataError, UserError

PUBLISHED = {"phoenix": ("Phoenix-2014T", {"train": 7096, "dev": 519, "test": 642}),
             "csl_daily": ("CSL-Daily", {"train": 18401, "dev": 1077, "test": 1176})}
SPLITS = ("train", "dev", "test")
SHOWN = 20  # names listed per problem; the count is always the full one
# what stops training, in the order printed
STOPS = ("unreadable manifest", "bad rows", "empty sentences", "missing media", "empty media", "unreadable media")


@dataclass
class CheckConfig:
    data: str = ""          # a manifest folder (or one .jsonl), a Phoenix-2014T root or a CSL-Daily root
    max_frames: int = 256   # list clips longer than this (training samples them down to it; VCP's default)
    decode: bool = True     # decode every frame as training will; false: count frames from the container
    #                         header and the folder's file names (~4x faster, misses a corrupt frame inside)


# ---------------------------------------------------------------------------- rows

def _split_sources(data: str, kind: str) -> list:
    """[(split, manifest file or None)]: a .jsonl is its own split; a folder's missing
    {split}.jsonl is skipped; Phoenix-2014T and CSL-Daily have all three."""
    p = Path(data)
    if kind != "manifest":
        return [(s, None) for s in SPLITS]
    if p.is_file():
        return [(p.stem, p)]
    found = [(s, p / f"{s}.jsonl") for s in SPLITS if (p / f"{s}.jsonl").is_file()]
    if not found:
        raise UserError(f"{p}: no train.jsonl, dev.jsonl or test.jsonl; the doctor checks those splits")
    return found


# ---------------------------------------------------------------------------- media

def _reason(e: Exception, video: Path) -> str:
    # the reader's message without the clip's own path (named already) and without its advice
    return str(e).replace(f"{video}/", "").replace(f"{video}: ", "").split("; ")[0]


def _frames(video: Path, decode: bool):
    """(frame count, None), or (None, (problem, reason)) when training could not read the clip."""
    if not video.exists():
        return None, ("missing media", "")
    try:
        if video.is_dir():
            try:
                files = readers.frame_files(video)
            except DataError:
                return None, ("empty media", "no frame images")
            return (len(readers.read_video(video)) if decode else len(files)), None
        if video.stat().st_size == 0:
            return None, ("empty media", "0 bytes")
        if not decode:
            try:
                with av.open(str(video)) as c:
                    n = c.streams.video[0].frames if c.streams.video else 0
            except av.FFmpegError:
                n = 0  # decoding below names the fault as training's reader would
            if n:
                return n, None  # else the container does not store it (e.g. webm): decode
        counts = []
        # only the count is needed: every frame is decoded, none is converted to RGB
        readers.read_video(video, sample=lambda n: counts.append(n) or [])
        return counts[0], None
    except (DataError, OSError) as e:  # OSError: a folder or file we may not read
        return None, ("unreadable media", _reason(e, video))


# ---------------------------------------------------------------------------- one split

def check_split(data: str, kind: str, split: str, manifest, config: CheckConfig) -> dict:
    """Everything the doctor prints about one split: rows, problems {name: [lines]}, frames."""
    problems = {k: [] for k in STOPS}
    problems["long clips"] = []
    try:
        rows = (readers.read_manifest(manifest, check_files=False, problems=problems) if manifest
                else readers.load_rows(data, split, check_files=False))
    except UserError as e:
        problems["unreadable manifest"].append(str(e))
        return {"split": split, "rows": None, "problems": problems, "frames": [], "texts": []}
    frames = []
    for r in tqdm(rows, desc=f"checking {split}", disable=None, leave=False, dynamic_ncols=True):
        video = Path(r["video"])
        n, bad = _frames(video, config.decode)
        name = f"{r['id']} {os.path.relpath(video, data if Path(data).is_dir() else Path(data).parent)}"
        if bad:
            problems[bad[0]].append(f"{name}: {bad[1]}" if bad[1] else name)
            continue
        frames.append(n)
        if n > config.max_frames:
            problems["long clips"].append(f"{r['id']} {n} frames")
    return {"split": split, "rows": len(rows), "problems": problems, "frames": frames,
            "texts": [r["text"] for r in rows if r["text"]]}


# ---------------------------------------------------------------------------- printing

def _listed(label: str, items: list):
    print(f"  {label}: {len(items)}")
    for s in items[:SHOWN]:
        print(f"    {s}")
    if len(items) > SHOWN:
        print(f"    ... and {len(items) - SHOWN} more")


def _spread(values) -> str:
    return f"min {min(values)} / median {statistics.median(values):g} / max {max(values)}"


def _language(data: str, texts: list) -> tuple:
    try:
        return readers.language_of(data)
    except UserError:  # it reads train.jsonl strictly; on a bad row decide by its rule on the rows that parsed
        texts = texts[:200]
        return ("Chinese", "char") if 2 * sum(map(readers._is_cjk, texts)) > len(texts) else ("German", "word")


def _print_split(r: dict, published, config: CheckConfig, level: str, train_vocab):
    """One split's report; returns its vocabulary (dev and test are compared with train's)."""
    print(f"{r['split']}:")
    p = r["problems"]
    if r["rows"] is None:
        _listed("unreadable manifest", p["unreadable manifest"])
        return None
    rows = f"  rows: {r['rows']}"
    if published and r["split"] in published[1]:
        want, have = published[1][r["split"]], r["rows"]
        differs = f"{abs(want - have)} {'fewer' if have < want else 'more'}"
        rows += f", published {want} ({published[0]}): {'matches' if want == have else differs}"
    print(rows)
    for k in STOPS[1:]:
        if p[k]:
            _listed(k, p[k])
    if not any(p[k] for k in STOPS):
        print("  every row has a sentence and readable media")
    if r["frames"]:
        print(f"  frames per clip ({len(r['frames'])} read): {_spread(r['frames'])}")
    _listed(f"clips longer than --max_frames={config.max_frames}", p["long clips"])
    tokens = [list("".join(t.split())) if level == "char" else t.split() for t in r["texts"]]
    if not tokens:
        return None
    unit = "character" if level == "char" else "word"
    vocab = {w for s in tokens for w in s}
    unseen = f" ({len(vocab - train_vocab)} not in train)" if train_vocab is not None else ""
    lengths = _spread([len(s) for s in tokens])
    print(f"  vocabulary: {len(vocab)} {unit}s{unseen}; sentence length in {unit}s: {lengths}")
    return vocab


def check(config: CheckConfig) -> int:
    """Check every split of config.data and print the report; returns the count of problems that stop training."""
    if not config.data:
        raise UserError("--data is required: a manifest folder, a Phoenix-2014T root or a CSL-Daily root")
    if config.max_frames < 1:
        raise UserError(f"--max_frames={config.max_frames}: expected a positive frame count")
    kind = readers.dataset_kind(config.data)
    reports = [check_split(config.data, kind, s, m, config) for s, m in _split_sources(config.data, kind)]
    language, level = _language(config.data, [t for r in reports for t in r["texts"]])
    what = {"manifest": "a manifest", "phoenix": "Phoenix-2014T", "csl_daily": "CSL-Daily"}[kind]
    print(f"dataset: {config.data} ({what}; {language}: {'characters' if level == 'char' else 'words'})")
    train_vocab = None
    for r in reports:
        vocab = _print_split(r, PUBLISHED.get(kind), config, level, train_vocab)
        if r["split"] == "train":
            train_vocab = vocab
    counts = {k: sum(len(r["problems"][k]) for r in reports) for k in STOPS}
    total = sum(counts.values())
    stops = ", ".join(f"{k} {n}" for k, n in counts.items() if n)
    print(f"result: {total} problem(s) stop training: {stops}" if total else "result: nothing stops training")
    return total


def main(argv):
    if check(parse_config(CheckConfig, argv)):
        raise SystemExit(1)


def command(argv) -> None:
    """`python data.py check ...` (data.py's __main__): one-line errors through cli.cli."""
    if not argv or argv[0] != "check":
        print("usage: python data.py check --data=ROOT [--max_frames=256] [--decode=true]")
        raise SystemExit(2)
    cli(main, argv[1:])
