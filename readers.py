"""Reading the data from disk (off the reading path: file formats, not the method).

Videos (mp4 and anything PyAV reads; frame folders through Pillow), jsonl manifests, the
Phoenix-2014T and CSL-Daily layouts (each read into manifest rows), and the CPT corpus. Every
malformed file or row is a one-line DataError naming the file and the row.
"""

import json
import os
import re
from pathlib import Path
from typing import Optional

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from errors import DataError, MissingFileError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---------------------------------------------------------------------------- video io

def _natural_key(name: str):
    # images2.png before images10.png: digit runs compare as numbers. re.split with a group
    # alternates text/number, so keys of any two names line up position by position.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def frame_files(folder) -> list:
    """The frame images of a folder (png/jpg/...), in natural order of the numbers in their names."""
    folder = Path(folder)
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    if not files:
        raise DataError(f"{folder}: folder holds no frames ({'/'.join(IMAGE_EXTENSIONS)}); "
                        "point the data at a folder of frame images or at a video file")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _read_images(files) -> np.ndarray:
    out = None
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                frame = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # decodes fully
        except OSError as e:  # UnidentifiedImageError, truncated file, permissions
            raise DataError(f"{f}: unreadable image ({e}); re-extract or delete this frame") from None
        if out is None:
            out = np.empty((len(files),) + frame.shape, np.uint8)  # (T, H, W, 3)
        elif frame.shape != out.shape[1:]:
            raise DataError(f"{f}: frame of size {frame.shape[:2]}, the clip's first frame is "
                            f"{out.shape[1:3]}; all frames of a clip must have one size")
        out[i] = frame
    return out


def _read_container(path: Path, sample=None) -> np.ndarray:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: file has no video stream; give a video file or a frame folder")
            stream = container.streams.video[0]
            # decoder threads pay off on real frames; on tiny ones (the 32 px demo) starting
            # them costs more than decoding (measured: 4.5 vs 7.7 ms per 60-frame clip)
            small = stream.codec_context.width * stream.codec_context.height < 128 * 128
            stream.thread_type = "NONE" if small else "AUTO"
            decoded = list(container.decode(stream))  # every frame must be decoded (inter-frame coding)
            if not decoded:
                raise DataError(f"{path}: video has no frames; re-encode it")
            # ... but only the sampled ones are converted to RGB, the larger part of the cost. One
            # reformatter per clip keeps its colour converter; frame.to_ndarray(format="rgb24")
            # would build one per frame (8x slower on small frames).
            picked = range(len(decoded)) if sample is None else sample(len(decoded))
            rgb = VideoReformatter()
            out = None
            for i, k in enumerate(picked):
                frame = rgb.reformat(decoded[k], format="rgb24").to_ndarray()
                if out is None:
                    out = np.empty((len(picked),) + frame.shape, np.uint8)  # (T, H, W, 3)
                out[i] = frame
    except av.FFmpegError as e:  # truncated/corrupt/not a video; str(e) repeats the path, strerror does not
        why = getattr(e, "strerror", None) or str(e)
        raise DataError(f"{path}: cannot decode video ({why}); the file is corrupt or truncated, "
                        "re-download or re-encode it") from None
    return out


def read_video(path, sample=None) -> np.ndarray:
    """Frames of a video file (anything PyAV reads: mp4, avi, webm, ...), a frame folder or a
    .npy file of decoded frames.

    Returns uint8 (T, H, W, 3) RGB. `sample(num_frames) -> indices` picks frames: only those
    are read from a folder, and only those are converted to RGB from a video file.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such video file or frame folder; check the path "
                               "(manifest paths are relative to the manifest file)")
    if path.is_dir():
        files = frame_files(path)
        if sample is not None:
            files = [files[i] for i in sample(len(files))]
        return _read_images(files)
    if path.suffix == ".npy":
        return _read_npy(path, sample)
    return _read_container(path, sample)


def _read_npy(path: Path, sample=None) -> np.ndarray:
    # decoded frames saved with numpy (the demo's clips: `synth.py --video_format=npy`); no
    # pickles: allow_pickle=False reads plain arrays only
    try:
        frames = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable .npy clip ({e}); re-create it") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise DataError(f"{path}: a .npy clip must hold uint8 frames (T, H, W, 3) with T >= 1, "
                        f"got {frames.dtype} {frames.shape}")
    return np.array(frames if sample is None else frames[sample(len(frames))])


# ---------------------------------------------------------------------------- dataset readers
# Every reader returns manifest rows {id, video (absolute path), text, gloss, signer};
# gloss and signer are None where the source has none.

def _row(id, video, text, gloss=None, signer=None) -> dict:
    return {"id": str(id), "video": str(video), "text": text, "gloss": gloss, "signer": signer}


def _text_lines(path: Path, what: str = "row"):
    """(line number, text) of a UTF-8 text file; a line that is not UTF-8 names its number."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} {what} {n}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None


def _jsonl(path: Path):
    """(row number, object) for each non-empty line of a jsonl file; bad lines name their row."""
    for n, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} row {n}: bad json ({e.msg}); write one JSON object per line") from None
        if not isinstance(r, dict):
            raise DataError(f"{path} row {n}: expected a JSON object, got {type(r).__name__}")
        yield n, r


def read_manifest(path, check_files: bool = True, problems: Optional[dict] = None) -> list:
    """Rows of a jsonl manifest; `video` paths are relative to the manifest file. A bad row stops
    the read with one line, or, given `problems` (the dataset doctor's {kind: [lines]}), is listed
    there: a row without a video or with an id used before is skipped, one with an empty sentence
    kept with text "" (its clip is still checked)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: manifest not found; give a .jsonl file or a folder with {{split}}.jsonl")
    rows, seen, listed = [], {}, []

    def bad(kind: str, n: int, what: str, advice: str, line: str = ""):
        if problems is None:
            raise DataError(f"{path} row {n}: {what}; {advice}")
        listed.append(line or f"{path.name} row {n}: {what}")
        problems[kind].append(listed[-1])

    for n, r in _jsonl(path):
        video, text = r.get("video"), r.get("text")
        if not isinstance(video, str) or not video:
            bad("bad rows", n, "no 'video'", "every row needs the path of its mp4 or frame folder")
            continue
        vpath = Path(os.path.abspath(path.parent / video))  # absolute paths stay as they are
        id = str(r.get("id", vpath.stem))
        if not isinstance(text, str) or not text.strip():
            bad("empty sentences", n, "no text or empty 'text'", "every row needs its spoken sentence",
                f"{path.name} row {n} {id}")
            text = ""
        if check_files and not vpath.exists():
            raise MissingFileError(f"{path} row {n}: video {vpath} not found; "
                                   "paths are relative to the manifest file")
        if id in seen:
            bad("bad rows", n, f"id {id!r} already used in row {seen[id]}", "ids must be unique")
            continue
        seen[id] = n
        rows.append(_row(id, vpath, text.strip(), r.get("gloss"), r.get("signer")))
    if not rows and not listed:
        raise DataError(f"{path}: manifest has no rows")
    return rows


def _split_name(split: str, where) -> str:
    s = {"val": "dev", "valid": "dev", "validation": "dev"}.get(split, split)
    if s not in ("train", "dev", "test"):
        raise UserError(f"{where}: unknown split {split!r}; use train, dev or test")
    return s


def _read_table(path: Path, need, kind: str):
    """'|'-separated file with a header line -> (header column index, [(line number, fields)])."""
    if not path.is_file():
        raise MissingFileError(f"{path}: {kind} file not found; check the dataset root")
    lines = [line.rstrip("\r\n") for _, line in _text_lines(path, "line")]
    header = [c.strip().lower() for c in lines[0].split("|")] if lines else []
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"{path}: header {'|'.join(header)!r} lacks column(s) {', '.join(missing)}; "
                        f"expected a '|'-separated header with {'|'.join(need)}")
    out = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = [c.strip() for c in line.split("|")]
        if len(fields) != len(header):
            raise DataError(f"{path} line {n}: {len(fields)} '|'-separated fields, the header has {len(header)}")
        out.append((n, fields))
    return {c: i for i, c in enumerate(header)}, out


def _phoenix_root(root: Path) -> Path:
    # accept both the corpus folder and the release folder above it
    if (root / "PHOENIX-2014-T" / "annotations").is_dir() and not (root / "annotations").is_dir():
        return root / "PHOENIX-2014-T"
    return root


def _frames_folder(video: Path, where: str, layout: str, check_files: bool) -> Path:
    """A clip's frame folder, which must exist when check_files (the dataset's own layout named)."""
    if check_files and not video.is_dir():
        raise MissingFileError(f"{where}: no frames folder {video}; extract the frames into {layout}")
    return video


def read_phoenix(root, split: str, check_files: bool = True) -> list:
    """Phoenix-2014T: annotations/manual/PHOENIX-2014-T.{split}.corpus.csv ('|'-separated,
    name|video|start|end|speaker|orth|translation); frames features/fullFrame-210x260px/{split}/{name}/."""
    root = _phoenix_root(Path(root))
    s = _split_name(split, root)
    csv = root / "annotations" / "manual" / f"PHOENIX-2014-T.{s}.corpus.csv"
    col, table = _read_table(csv, ("name", "speaker", "orth", "translation"), "Phoenix-2014T annotation")
    frames = root / "features" / "fullFrame-210x260px" / s
    rows = []
    for n, f in table:
        name, text = f[col["name"]], f[col["translation"]]
        if not text:
            raise DataError(f"{csv} line {n}: empty translation for {name}")
        video = _frames_folder(frames / name, f"{csv} line {n}", "features/fullFrame-210x260px/", check_files)
        rows.append(_row(name, os.path.abspath(video), text, f[col["orth"]] or None, f[col["speaker"]] or None))
    if not rows:
        raise DataError(f"{csv}: no rows")
    return rows


def read_csl_daily(root, split: str, check_files: bool = True) -> list:
    """CSL-Daily: sentence_label/split_1.txt (name|split), sentence_label/video_map.txt
    (index|name|length|gloss|char|word|postag), frames sentence/frames_512x512/{name}/*.jpg.
    The sentence is the `char` column with its separating spaces removed."""
    root = Path(root)
    s = _split_name(split, root)
    split_file = root / "sentence_label" / "split_1.txt"
    map_file = root / "sentence_label" / "video_map.txt"
    scol, splits = _read_table(split_file, ("name", "split"), "CSL-Daily split")
    mcol, table = _read_table(map_file, ("name", "gloss", "char"), "CSL-Daily video map")
    labels = {f[mcol["name"]]: (n, f) for n, f in table}
    frames = root / "sentence" / "frames_512x512"
    rows = []
    for n, f in splits:
        name = f[scol["name"]]
        if _split_name(f[scol["split"]], f"{split_file} line {n}") != s:
            continue
        if name not in labels:
            raise DataError(f"{split_file} line {n}: {name} has no row in {map_file}")
        m, lab = labels[name]
        text = "".join(lab[mcol["char"]].split())
        if not text:
            raise DataError(f"{map_file} line {m}: empty char (sentence) column for {name}")
        video = _frames_folder(frames / name, f"{split_file} line {n}", "sentence/frames_512x512/", check_files)
        signer = re.search(r"_(P\d+)_", name)  # names are S{sentence}_P{signer}_T{take}
        rows.append(_row(name, os.path.abspath(video), text, lab[mcol["gloss"]] or None,
                         signer.group(1) if signer else None))
    if not rows:
        raise DataError(f"{split_file}: no rows for split {s!r}")
    return rows


def dataset_kind(data) -> str:
    """'manifest' (a .jsonl file or a folder of {split}.jsonl), 'phoenix' or 'csl_daily'."""
    p = Path(data)
    if p.is_file() and p.suffix == ".jsonl":
        return "manifest"
    if p.is_dir():
        if (_phoenix_root(p) / "annotations" / "manual").is_dir():
            return "phoenix"
        if (p / "sentence_label").is_dir():
            return "csl_daily"
        if any(p.glob("*.jsonl")):
            return "manifest"
    raise MissingFileError(f"{p}: not a dataset; give a manifest (.jsonl or a folder of {{split}}.jsonl), "
                           "a Phoenix-2014T root (annotations/manual/) or a CSL-Daily root (sentence_label/)")


def load_rows(data, split: str = "train", check_files: bool = True) -> list:
    """Manifest rows of one split of any supported dataset (a .jsonl file is its own split)."""
    kind, p = dataset_kind(data), Path(data)
    if kind == "phoenix":
        return read_phoenix(p, split, check_files)
    if kind == "csl_daily":
        return read_csl_daily(p, split, check_files)
    if p.is_file():
        return read_manifest(p, check_files)
    f = p / f"{split}.jsonl"
    if not f.is_file():
        have = sorted(q.stem for q in p.glob("*.jsonl"))
        raise MissingFileError(f"{f}: no manifest for split {split!r}; this folder has {have}")
    return read_manifest(f, check_files)


def _is_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" for ch in text)


def language_of(data) -> tuple:
    """(language, score level): ('German', 'word') for Phoenix, ('Chinese', 'char') for CSL-Daily;
    a manifest is Chinese when most of its sentences hold CJK characters, else German."""
    kind, p = dataset_kind(data), Path(data)
    if kind == "phoenix":
        return "German", "word"
    if kind == "csl_daily":
        return "Chinese", "char"
    f = p if p.is_file() else (p / "train.jsonl" if (p / "train.jsonl").is_file() else sorted(p.glob("*.jsonl"))[0])
    texts = [r["text"] for r in read_manifest(f, check_files=False)[:200]]
    cjk = sum(_is_cjk(t) for t in texts)
    return ("Chinese", "char") if 2 * cjk > len(texts) else ("German", "word")


# ---------------------------------------------------------------------------- CPT corpus

def read_sentences(path, field: str = "hypothesis") -> list:
    """One sentence a line of a plain-text file, or the `field` ("hypothesis" / "reference") of
    each row of a predictions .jsonl (eval.py writes {"id", "hypothesis", "reference"})."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: not found; give a text file (one sentence a line) or a predictions .jsonl")
    if path.suffix == ".jsonl":
        out = []
        for n, r in _jsonl(path):
            if not isinstance(r.get(field), str):
                raise DataError(f"{path} row {n}: no {field!r}; a predictions .jsonl has \"hypothesis\" and "
                                "\"reference\" in every row")
            out.append(r[field])
    else:  # every line counts, an empty one too (an empty translation is a sentence)
        out = [line.rstrip("\r\n") for _, line in _text_lines(path, "line")]
    if not out:
        raise DataError(f"{path}: empty; give one sentence a line")
    return out


def read_corpus(path) -> list:
    """CPT corpus jsonl: rows {"text"} (plain sentences) or {"gloss", "text"} (gloss-text pairs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: corpus not found; give a jsonl file of {{\"text\"}} or {{\"gloss\", \"text\"}} rows")
    rows = []
    for n, r in _jsonl(path):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise DataError(f"{path} row {n}: no text or empty 'text'; every row needs a sentence")
        if "gloss" in r and (not isinstance(r["gloss"], str) or not r["gloss"].strip()):
            raise DataError(f"{path} row {n}: empty 'gloss'; drop the key for a plain sentence")
        rows.append({"text": r["text"].strip(), **({"gloss": r["gloss"].strip()} if "gloss" in r else {})})
    if not rows:
        raise DataError(f"{path}: corpus has no rows")
    return rows
