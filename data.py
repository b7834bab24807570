"""Data for LLaVA-SLT (paper sections 4.1 and C; DESIGN.md section 4).

Video reading (mp4 through PyAV, frame folders through Pillow), frame sampling, the clip
transforms, readers of the public dataset layouts into manifest rows, collate functions
with masks, the VLT prompt/label builder, CPT corpus packing, and a synthetic sign language
that the demo and the tests render to real mp4 files.
"""

# ============================================================================ core
# (owned by the data-core work: video io, transforms, readers, datasets, collate, prompts, corpus)

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from PIL import Image

from model import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """A data file or row the user supplied is malformed; the message names it and says what to do."""


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
    """Frames of a video file (anything PyAV reads: mp4, avi, webm, ...) or a frame folder.

    Returns uint8 (T, H, W, 3) RGB. `sample(num_frames) -> indices` picks frames: only those
    are read from a folder, and only those are converted to RGB from a video file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such video file or frame folder; check the path "
                                "(manifest paths are relative to the manifest file)")
    if path.is_dir():
        files = frame_files(path)
        if sample is not None:
            files = [files[i] for i in sample(len(files))]
        return _read_images(files)
    return _read_container(path, sample)


def sample_indices(num_frames: int, max_frames=None, stride: int = 1, train: bool = False,
                   rng=None) -> np.ndarray:
    """Frame indices: every `stride`-th frame, then at most `max_frames` of them, spread uniformly.

    The strided sequence is cut into max_frames equal segments; eval takes each segment's
    centre (deterministic), train a random frame inside each segment (and a random stride phase).
    """
    if num_frames < 1:
        raise ValueError(f"sample_indices: a clip needs at least one frame, got {num_frames}")
    if stride < 1:
        raise ValueError(f"sample_indices: stride must be >= 1, got {stride}")
    if train and rng is None:
        rng = np.random.default_rng()
    start = int(rng.integers(min(stride, num_frames))) if train and stride > 1 else 0
    idx = np.arange(start, num_frames, stride)
    n, m = len(idx), max_frames
    if m and n > m:
        if train:
            bounds = np.arange(m + 1) * n // m  # integer segment edges, strictly increasing as n > m
            pos = bounds[:-1] + rng.integers(0, bounds[1:] - bounds[:-1])
        else:
            pos = (2 * np.arange(m) + 1) * n // (2 * m)  # floor of each segment's centre
        idx = idx[pos]
    return idx


# ---------------------------------------------------------------------------- transforms

@dataclass
class ClipAugment:
    """One clip's random draw; every frame of the clip gets the same one (paper section C)."""
    top: int = 0
    left: int = 0
    angle: float = 0.0  # degrees
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _gray(x):  # (T, 3, H, W) -> (T, 1, H, W); one new tensor, the sums in place
    return (x[:, 0:1] * 0.299).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)


def _rotated_crop(x, top: int, left: int, size: int, angle: float, flip: bool = False, grid_hw=None):
    """Crop size x size at (top, left) from x (T, C, H, W), the crop window rotated by `angle`
    degrees about its centre and mirrored left-right if `flip`; one bilinear grid_sample for
    the whole clip, edge pixels repeated outside. top/left are pixels of an image of size `grid_hw` (default
    x's own): grid_sample's coordinates are resolution-free, so sampling a smaller x here is
    bilinear resize + crop in one step."""
    T, C = x.shape[:2]
    H, W = grid_hw if grid_hw is not None else x.shape[2:]
    a = np.deg2rad(angle)
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2  # output pixel centres, centred
    dv, du = torch.meshgrid(r, r, indexing="ij")  # (size, size) row / column offsets
    if flip:
        du = -du
    cx, cy = left + (size - 1) / 2, top + (size - 1) / 2
    xs = cx + np.cos(a) * du - np.sin(a) * dv  # input pixel coordinates
    ys = cy + np.sin(a) * du + np.cos(a) * dv
    grid = torch.stack([(2 * xs + 1) / W - 1, (2 * ys + 1) / H - 1], dim=-1)  # align_corners=False
    grid = grid.to(x.dtype).unsqueeze(0).expand(T, size, size, 2)  # (T, size, size, 2)
    # "border": corners rotated in from outside repeat the edge (no black wedges), and sampling
    # a smaller x matches F.interpolate, which clamps at the edge too
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _resize_uint8(x, size: int):  # (T, 3, h, w) uint8 -> (T, 3, size, size) uint8, channels-last
    return F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size),
                         mode="bilinear", align_corners=False, antialias=True)


class VideoTransform:
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, size, size), ImageNet-normalised.

    Centre square crop, resize to `resize`, then a random (train) / centre (eval) crop of
    `size` (paper section C: 256 -> 224, or 384 -> 336). Training adds colour jitter, a small
    rotation and a horizontal flip, drawn once per clip and applied to every frame.
    """

    def __init__(self, size: int = 224, resize: int = 256, train: bool = False,
                 color_jitter: float = 0.2, rotation: float = 5.0, flip_p: float = 0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if size > resize:
            raise ValueError(f"VideoTransform: crop size {size} is larger than the resize {resize}")
        self.size, self.resize, self.train = size, resize, train
        self.color_jitter, self.rotation, self.flip_p = color_jitter, rotation, flip_p
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def sample(self, rng) -> ClipAugment:
        """One clip's draw. Always the same number of draws, so the stream does not depend on
        which augmentations are switched on."""
        span = self.resize - self.size + 1
        j = self.color_jitter
        return ClipAugment(
            top=int(rng.integers(span)), left=int(rng.integers(span)),
            angle=float(rng.uniform(-self.rotation, self.rotation)),
            flip=bool(rng.random() < self.flip_p),
            brightness=float(rng.uniform(1 - j, 1 + j)),
            contrast=float(rng.uniform(1 - j, 1 + j)),
            saturation=float(rng.uniform(1 - j, 1 + j)))

    def __call__(self, frames, rng=None, augment: ClipAugment = None) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(frames))
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"VideoTransform: expected uint8 frames (T, H, W, 3), got "
                             f"{x.dtype} {tuple(x.shape)}")
        # Speed: resize in uint8 (PyTorch's vectorised channels-last path), make one float tensor
        # of the output size, then work in place; fresh large tensors cost more than arithmetic.
        T, H, W, _ = x.shape
        s, R, S = min(H, W), self.resize, self.size
        t0, l0 = (H - s) // 2, (W - s) // 2
        x = x[:, t0:t0 + s, l0:l0 + s].permute(0, 3, 1, 2)  # (T, 3, s, s) centre square, channels-last
        if augment is None and self.train:
            augment = self.sample(rng if rng is not None else np.random.default_rng())
        a = augment
        if a is not None and a.angle != 0:
            # resize, rotation, crop and flip in one bilinear resampling; a shrinking resize
            # (512 px CSL-Daily frames) is antialiased first
            if s > R:
                x = _resize_uint8(x, R)
            src = torch.empty(x.shape, dtype=torch.float32)
            src.copy_(x)  # (T, 3, s or R, s or R), contiguous for grid_sample
            out = _rotated_crop(src, a.top, a.left, S, a.angle, a.flip, grid_hw=(R, R)).contiguous()
        else:
            if s != R:
                x = _resize_uint8(x, R)  # (T, 3, R, R)
            top, left = (a.top, a.left) if a is not None else ((R - S) // 2,) * 2  # eval: centre crop
            crop = x[:, :, top:top + S, left:left + S]
            if a is not None and a.flip:
                crop = crop.flip(-1)
            out = torch.empty((T, 3, S, S), dtype=torch.float32)
            out.copy_(crop)  # (T, 3, S, S), values 0..255
        if a is None:
            return out.mul_(1 / (255 * self.std)).sub_(self.mean / self.std)
        # Colour jitter as torchvision's (brightness, contrast, saturation), one draw per clip.
        # Factors <= 1 blend towards values in [0, 1] and cannot leave it, so only > 1 clamps.
        out.mul_(a.brightness / 255)
        if a.brightness > 1:
            out.clamp_(max=1)
        if a.contrast != 1:  # towards the clip's mean grey: one map for every frame
            m = float((out.mean(dim=(0, 2, 3)) * _GRAY_WEIGHTS).sum())
            out.mul_(a.contrast).add_((1 - a.contrast) * m)
            if a.contrast > 1:
                out.clamp_(0, 1)
        if a.saturation != 1:
            out.mul_(a.saturation).add_(_gray(out).mul_(1 - a.saturation))
            if a.saturation > 1:
                out.clamp_(0, 1)
        return out.sub_(self.mean).div_(self.std)  # (T, 3, S, S)


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


def read_manifest(path, check_files: bool = True) -> list:
    """Rows of a jsonl manifest; `video` paths are relative to the manifest file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; give a .jsonl file or a folder with {{split}}.jsonl")
    rows, seen = [], {}
    for n, r in _jsonl(path):
        video, text = r.get("video"), r.get("text")
        if not isinstance(video, str) or not video:
            raise DataError(f"{path} row {n}: no 'video'; every row needs the path of its mp4 or frame folder")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {n}: no text or empty 'text'; every row needs its spoken sentence")
        vpath = Path(os.path.abspath(path.parent / video))  # absolute paths stay as they are
        if check_files and not vpath.exists():
            raise FileNotFoundError(f"{path} row {n}: video {vpath} not found; "
                                    "paths are relative to the manifest file")
        id = str(r.get("id", vpath.stem))
        if id in seen:
            raise DataError(f"{path} row {n}: id {id!r} already used in row {seen[id]}; ids must be unique")
        seen[id] = n
        rows.append(_row(id, vpath, text.strip(), r.get("gloss"), r.get("signer")))
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    return rows


def _split_name(split: str, where) -> str:
    s = {"val": "dev", "valid": "dev", "validation": "dev"}.get(split, split)
    if s not in ("train", "dev", "test"):
        raise ValueError(f"{where}: unknown split {split!r}; use train, dev or test")
    return s


def _read_table(path: Path, need, kind: str):
    """'|'-separated file with a header line -> (header column index, [(line number, fields)])."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} file not found; check the dataset root")
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
        video = frames / name
        if check_files and not video.is_dir():
            raise FileNotFoundError(f"{csv} line {n}: no frames folder {video}; "
                                    "extract the frames into features/fullFrame-210x260px/")
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
        video = frames / name
        if check_files and not video.is_dir():
            raise FileNotFoundError(f"{split_file} line {n}: no frames folder {video} for {name}; "
                                    "extract the frames into sentence/frames_512x512/")
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
    raise FileNotFoundError(f"{p}: not a dataset; give a manifest (.jsonl or a folder of {{split}}.jsonl), "
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
        raise FileNotFoundError(f"{f}: no manifest for split {split!r}; this folder has {have}")
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


# ---------------------------------------------------------------------------- clip dataset

class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset of transformed clips; the DataLoader workers decode.

    Random draws come from a Generator seeded by (seed, epoch, index), so a run is the same
    whatever the number of workers or ranks, and resumes exactly after `set_epoch(epoch)`.
    """

    def __init__(self, rows, transform, max_frames=None, stride: int = 1, train: bool = False,
                 seed: int = 0, cache_videos: bool = False):
        self.rows, self.transform = list(rows), transform
        self.max_frames, self.stride, self.train, self.seed = max_frames, stride, train, seed
        self.epoch = 0
        # cache_videos: keep every decoded clip (uint8, all frames) in memory after its first
        # read, so later epochs skip decoding; for small datasets (the CPU demo), with
        # num_workers=0 (each worker process would hold its own copy)
        self.videos = {} if cache_videos else None

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pick = lambda n: sample_indices(n, self.max_frames, self.stride, self.train, rng)  # noqa: E731
        if self.videos is None:
            frames = read_video(row["video"], sample=pick)
        else:
            if index not in self.videos:
                self.videos[index] = read_video(row["video"])
            video = self.videos[index]
            frames = video[pick(len(video))]
        return {"id": row["id"], "frames": self.transform(frames, rng), "text": row["text"], "index": index}


def collate_clips(items) -> dict:
    """Pad clips to the longest: frames (B, Tmax, 3, H, W) zeros, frame_mask (B, Tmax) True = valid."""
    lengths = torch.tensor([it["frames"].shape[0] for it in items])
    B, T = len(items), int(lengths.max())
    frames = items[0]["frames"].new_zeros((B, T) + tuple(items[0]["frames"].shape[1:]))
    for i, it in enumerate(items):
        frames[i, :lengths[i]] = it["frames"]
    return {"ids": [it["id"] for it in items],
            "index": torch.tensor([it["index"] for it in items]),
            "frames": frames,  # (B, T, 3, H, W)
            "frame_mask": torch.arange(T)[None, :] < lengths[:, None],  # (B, T)
            "lengths": lengths,
            "texts": [it["text"] for it in items]}


# ---------------------------------------------------------------------------- prompts (paper Tab. F/G, 8, 9)

def system_prompt(language: str = "German", task: bool = True, format: bool = True) -> str:
    """The system turn: 'You are a helpful assistant.' + task prompt + format prompt."""
    parts = ["You are a helpful assistant."]
    if task:
        parts.append("Use your expertise to provide the most precise translation.")
    if format:
        parts.append(f"Answer with one single {language} sentence.")
    return " ".join(parts)


_USER_SENTINEL = "@@user-content-slot@@"  # no spaces, so templates that trim leave it whole


def chat_prefix_ids(tok, system) -> list:
    """The token ids every VLT prompt starts with: the system turn and the user header, up to
    the first visual slot (what a frozen LLM's PrefixCache holds)."""
    example = build_chat_example(tok, system, 0)
    return example["input_ids"][:example["visual_start"]]


def build_chat_example(tok, system, user, answer=None, visual_slot_id=None) -> dict:
    """Token ids and labels of one chat turn: system, user, and (for training) the answer.

    `user` is text (gloss sequence, CPT) or an int n: n visual-token slots (VLT) filled with
    `visual_slot_id` (default the pad id), replaced by connector outputs inside the model.
    Segments are tokenised on their own and concatenated, so the slots and the answer sit at
    known positions. Labels are IGNORE_INDEX except the answer and the end-of-turn token.
    """
    is_visual = isinstance(user, (int, np.integer)) and not isinstance(user, bool)
    if answer is not None:
        answer = answer.strip()
        if not answer:
            raise ValueError("build_chat_example: empty answer; every training example needs its target sentence")
    messages = [{"role": "system", "content": system}] if system is not None else []
    user_turn = {"role": "user", "content": _USER_SENTINEL}
    gen = tok.apply_chat_template(messages + [user_turn], add_generation_prompt=True, tokenize=False)
    if gen.count(_USER_SENTINEL) != 1:
        raise ValueError("build_chat_example: the tokenizer's chat template does not copy the user "
                         "content verbatim into the prompt; use a template that does")
    prefix, suffix = gen.split(_USER_SENTINEL)
    prefix_ids = tok.encode(prefix)
    if is_visual:
        if user < 0:
            raise ValueError(f"build_chat_example: number of visual tokens must be >= 0, got {user}")
        slot = tok.pad_token_id if visual_slot_id is None else visual_slot_id
        user_ids, visual_start, n_visual = [int(slot)] * int(user), len(prefix_ids), int(user)
    else:
        user_ids, visual_start, n_visual = tok.encode(user.strip()), None, 0
    input_ids = prefix_ids + user_ids + tok.encode(suffix)
    labels = [IGNORE_INDEX] * len(input_ids)
    if answer is not None:
        full = tok.apply_chat_template(messages + [user_turn, {"role": "assistant", "content": answer}],
                                       add_generation_prompt=False, tokenize=False)
        if not full.startswith(gen):
            raise ValueError("build_chat_example: the chat template renders the conversation with the "
                             "answer differently from the generation prompt; labels cannot be aligned")
        tail = full[len(gen):]
        if not tail.startswith(answer):
            raise ValueError(f"build_chat_example: the chat template changed the answer text "
                             f"(rendered {tail[:60]!r}); use a template that copies it verbatim")
        answer_ids, end_ids = tok.encode(answer), tok.encode(tail[len(answer):])
        eos = set(tok.eos_token_ids)
        stop = next((k for k, t in enumerate(end_ids) if t in eos), None)
        if stop is None:
            raise ValueError(f"build_chat_example: the assistant turn ends with {tail[len(answer):]!r}, "
                             f"which holds none of the tokenizer's eos ids {sorted(eos)}; fix the "
                             "tokenizer's eos tokens or generation would never stop")
        # supervise the answer and the end-of-turn token; what follows it (a newline) is not predicted
        input_ids = input_ids + answer_ids + end_ids
        labels = labels + answer_ids + end_ids[:stop + 1] + [IGNORE_INDEX] * (len(end_ids) - stop - 1)
    return {"input_ids": input_ids, "labels": labels, "visual_start": visual_start, "n_visual": n_visual}


def collate_vlt(examples, pad_id: int, padding_side: str = "right") -> dict:
    """Pad chat examples: input_ids / labels (IGNORE_INDEX on pad) / attention_mask (B, L), and
    slot_mask (B, L) True at the visual-token slots (what LLaVASLT.splice fills). Left padding is
    for generation; visual_start shifts with it (-1 where an example has none)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"collate_vlt: padding_side must be 'left' or 'right', got {padding_side!r}")
    B, L = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    visual_start = torch.full((B,), -1, dtype=torch.long)
    n_visual = torch.zeros((B,), dtype=torch.long)
    slot_mask = torch.zeros((B, L), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        o = L - n if padding_side == "left" else 0
        input_ids[i, o:o + n] = torch.tensor(e["input_ids"])
        labels[i, o:o + n] = torch.tensor(e.get("labels", [IGNORE_INDEX] * n))
        attention_mask[i, o:o + n] = 1
        if e.get("visual_start") is not None:
            visual_start[i] = e["visual_start"] + o
            n_visual[i] = e.get("n_visual", 0)
            slot_mask[i, visual_start[i]:visual_start[i] + n_visual[i]] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "visual_start": visual_start, "n_visual": n_visual, "slot_mask": slot_mask}


# ---------------------------------------------------------------------------- CPT corpus

def read_corpus(path) -> list:
    """CPT corpus jsonl: rows {"text"} (plain sentences) or {"gloss", "text"} (gloss-text pairs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus not found; give a jsonl file of {{\"text\"}} or {{\"gloss\", \"text\"}} rows")
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


def pack_blocks(tok, texts, block_size: int, eos_id=None) -> torch.Tensor:
    """Tokenise, append EOS (default the tokenizer's first eos id) to each text, concatenate,
    and cut into (N, block_size) blocks; the tail shorter than a block is dropped."""
    eos = tok.eos_token_ids[0] if eos_id is None else eos_id
    ids = []
    for t in texts:
        ids.extend(tok.encode(t))
        ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"pack_blocks: the corpus has {len(ids)} tokens, fewer than one block of "
                        f"{block_size}; lower block_size or add text")
    return torch.tensor(ids[:n * block_size], dtype=torch.long).view(n, block_size)  # (N, block_size)


# ============================================================================ synthetic
# (owned by the synthetic-language work: the invented sign language, its renderer and `python data.py synth`)
#
# A small invented sign language for the demo and the tests (DESIGN.md section 4, "Synthetic"):
# weather-forecast glosses rendered as a dominant hand (shape x location x movement) in front
# of a flat signer, written as real mp4 files plus manifests, a CPT text corpus and meta.json.
# It is built so that each of the three stages has something to learn:
# - most glosses come in minimal pairs whose second member is the first played backwards, so
#   no single frame and no bag of frames tells them apart: only frame order does (the local
#   attention of the hierarchical encoder, DESIGN.md section 5);
# - the spoken sentence reorders the glosses and adds unsigned words, and dev/test use gloss
#   combinations that never occur in training: translating needs the grammar (CPT), not memory.

import argparse
import functools
import itertools
import multiprocessing
import shutil
import sys
import time

from tqdm import tqdm

SYNTH_FPS = 25
SYNTH_CANVAS = 32          # every coordinate below is in pixels of a 32-px canvas, scaled to `size`
SYNTH_HAND = 7.0           # hand size (px on the 32-px canvas) before the signer's scale
SYNTH_SIGN_FRAMES = 10     # frames of one sign at speed 1; a signer's speed maps it to 8..12
SYNTH_TRANSITION = (3, 4)  # frames of the neutral hand between signs (and before/after the sentence)
SYNTH_CRF = 10             # libx264 quality; low, since the shapes are a few pixels wide
SYNTH_X264_PARAMS = "threads=1:lookahead-threads=1:sliced-threads=0:rc-lookahead=0:mbtree=0:log-level=none"
SYNTH_HELDOUT_CAP = 0.4    # at most this share of a template's combinations goes to dev + test
SYNTH_PAIR_SHARE = 0.7     # share of gloss-text pairs in the CPT corpus (the rest: plain sentences)
SYNTH_NOISE_BANK = 256     # noise frames a signer's clips draw from

# ---------------------------------------------------------------------------- phonology

# Handshapes as predicates over the hand's square, u (right) and v (down) in [-1, 1]. They are
# told apart by outline at ~7 px; "dot" is the neutral shape between signs and the resting hand.
HANDSHAPES = {
    "square": lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 1),
    "ring": lambda u, v: (np.hypot(u, v) <= 1.05) & (np.hypot(u, v) >= 0.5),
    "hbar": lambda u, v: np.abs(v) <= 0.35 + 0 * u,
    "vbar": lambda u, v: np.abs(u) <= 0.35 + 0 * v,
    "cross": lambda u, v: (np.abs(u) <= 0.3) | (np.abs(v) <= 0.3),
    "triangle": lambda u, v: np.abs(u) <= (v + 1.15) / 2,  # apex up
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.05,
    "xshape": lambda u, v: np.abs(np.abs(u) - np.abs(v)) <= 0.35,
    "dot": lambda u, v: np.hypot(u, v) <= 0.5,
}
NEUTRAL_SHAPE = "dot"

# Where the dominant hand signs, relative to a signer whose body centre is x = 16 and whose
# head is at (16, 7). The dominant side is the right of the image.
LOCATIONS = {
    "head": (24.0, 7.0),    # beside the head
    "chin": (16.0, 13.0),
    "chest": (16.0, 19.0),
    "side": (25.0, 19.0),   # beside the body
    "across": (8.0, 19.0),  # the other side of the body
    "belly": (16.0, 25.0),
    "hip": (24.0, 26.0),
}
REST = (21.0, 28.0)         # the dominant hand between signs (neutral shape); the other hand mirrors it
BODY_CENTRE_X = 16.0


@dataclass(frozen=True)
class Sign:
    """One gloss: handshape(s) x location(s) x movement of the dominant hand.

    movement: "path" (shapes[0] from locations[0] to locations[1]), "change" (shapes[0] then
    shapes[1] at locations[0]), "circle" (clockwise around locations[0]), "updown" /
    "sideways" (oscillation, the same forwards and backwards). `reverse_of` names the first
    member of a minimal pair: this sign is exactly that one played backwards.
    """
    gloss: str
    word_class: str
    movement: str
    shapes: tuple
    locations: tuple
    reverse_of: str = None


def _pair(first, second, word_class, movement, shapes, locations):
    # The second member is the time reversal of the first (path b -> a, change s2 -> s1,
    # counter-clockwise circle): the same frames in the opposite order.
    a = Sign(first, word_class, movement, shapes, locations)
    return [a, Sign(second, word_class, movement, shapes, locations, reverse_of=first)]


LEXICON = [
    *_pair("HEUTE", "MORGEN", "DAY", "path", ("square",), ("chest", "belly")),
    *_pair("MONTAG", "DIENSTAG", "DAY", "change", ("ring", "cross"), ("head",)),
    *_pair("MITTWOCH", "DONNERSTAG", "DAY", "change", ("triangle", "diamond"), ("chin",)),
    *_pair("FREITAG", "SAMSTAG", "DAY", "circle", ("cross",), ("chest",)),
    Sign("SONNTAG", "DAY", "updown", ("ring",), ("side",)),
    *_pair("VORMITTAG", "NACHMITTAG", "DAYTIME", "path", ("triangle",), ("head", "side")),
    *_pair("ABEND", "NACHT", "DAYTIME", "change", ("square", "xshape"), ("side",)),
    *_pair("NORD", "SUED", "REGION", "path", ("vbar",), ("belly", "chin")),
    *_pair("WEST", "OST", "REGION", "path", ("hbar",), ("side", "across")),
    *_pair("REGEN", "SCHNEE", "WEATHER", "path", ("xshape",), ("head", "hip")),
    *_pair("SONNE", "WOLKE", "WEATHER", "change", ("diamond", "square"), ("head",)),
    *_pair("NEBEL", "FROST", "WEATHER", "circle", ("diamond",), ("chin",)),
    *_pair("WIND", "GEWITTER", "WEATHER", "path", ("cross",), ("across", "hip")),
    *_pair("STARK", "LEICHT", "INTENSITY", "change", ("vbar", "hbar"), ("chest",)),
    *_pair("WARM", "KALT", "TEMPERATURE", "path", ("ring",), ("chin", "side")),
    *_pair("STEIGEN", "SINKEN", "TREND", "path", ("hbar",), ("hip", "head")),
    Sign("TEMPERATUR", "SUBJECT", "sideways", ("vbar",), ("chin",)),
]
SIGNS = {s.gloss: s for s in LEXICON}
WORD_CLASSES = {c: [s.gloss for s in LEXICON if s.word_class == c]
                for c in dict.fromkeys(s.word_class for s in LEXICON)}  # in lexicon order
MINIMAL_PAIRS = [(s.reverse_of, s.gloss) for s in LEXICON if s.reverse_of]


def _sign_path(sign: Sign, n: int) -> list:
    """The forward movement of a sign as n states (shape, x, y) on the 32-px canvas."""
    t = np.arange(n) / max(n - 1, 1)
    (x0, y0), shape = LOCATIONS[sign.locations[0]], sign.shapes[0]
    if sign.movement == "path":
        x1, y1 = LOCATIONS[sign.locations[1]]
        xs, ys, shapes = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, [shape] * n
    elif sign.movement == "change":
        xs, ys = np.full(n, x0), np.full(n, y0)
        shapes = [sign.shapes[0] if i < (n + 1) // 2 else sign.shapes[1] for i in range(n)]
    elif sign.movement == "circle":  # one clockwise turn on screen, starting at the top
        a = 2 * np.pi * np.arange(n) / n
        xs, ys, shapes = x0 + 3.5 * np.sin(a), y0 - 3.5 * np.cos(a), [shape] * n
    elif sign.movement == "updown":  # cos(4 pi t) is its own time reversal
        xs, ys, shapes = np.full(n, x0), y0 + 3.0 * np.cos(4 * np.pi * t), [shape] * n
    elif sign.movement == "sideways":
        xs, ys, shapes = x0 + 3.0 * np.cos(4 * np.pi * t), np.full(n, y0), [shape] * n
    else:
        raise ValueError(f"sign {sign.gloss}: unknown movement {sign.movement!r}")
    return list(zip(shapes, xs.tolist(), ys.tolist()))


# ---------------------------------------------------------------------------- signers

@dataclass(frozen=True)
class Signer:
    """How one signer looks: colours (RGB 0..255), offset (px), scale, speed and pixel noise."""
    name: str
    background: tuple
    body: tuple
    hand: tuple
    other_hand: tuple
    dx: int
    dy: int
    scale: float
    speed: float
    noise: float


def make_signers(seed: int, n: int = 8) -> list:
    """n signers, deterministic for a seed. Speed and scale are stratified over their ranges
    (one signer per 1/n of it), so even 8 signers span sign lengths 8..12 frames."""
    rng = np.random.default_rng([seed, 1])

    def spread(lo, hi):  # one value in each n-th of [lo, hi), in random order
        return lo + (hi - lo) * rng.permutation((np.arange(n) + rng.uniform(size=n)) / n)

    speeds, scales = spread(0.8, 1.2), spread(0.9, 1.1)
    signers = []
    for k in range(n):
        bg = np.clip(np.array([40, 44, 58]) + rng.integers(-12, 13, 3), 0, 255)
        body = np.clip(np.array([96, 98, 112]) + rng.integers(-15, 16, 3), 0, 255)
        hand = np.clip(np.array([238, 204, 170]) + rng.integers(-30, 16, 3), 0, 255)
        signers.append(Signer(
            name=f"signer{k + 1:02d}", background=tuple(bg.tolist()), body=tuple(body.tolist()),
            hand=tuple(hand.tolist()), other_hand=tuple(np.rint(hand * 0.7).astype(int).tolist()),
            dx=int(rng.integers(-2, 3)), dy=int(rng.integers(-2, 3)),
            scale=round(float(scales[k]), 3), speed=round(float(speeds[k]), 3),
            noise=round(float(rng.uniform(1.0, 3.0)), 2)))
    return signers


def sign_frames(signer: Signer) -> int:
    """Frames of one sign for this signer: 10 at speed 1, 8..12 over the speed range."""
    return int(round(SYNTH_SIGN_FRAMES / signer.speed))


def _to_pixels(signer: Signer, x: float, y: float, size: int) -> tuple:
    # canvas coordinates -> this signer's body (scale about the canvas centre, then offset) -> size
    k = size / SYNTH_CANVAS
    c = SYNTH_CANVAS / 2
    return (c + (x - c) * signer.scale + signer.dx) * k, (c + (y - c) * signer.scale + signer.dy) * k


@functools.lru_cache(maxsize=None)
def _hand_mask(shape: str, px: int) -> np.ndarray:
    u = (np.arange(px) + 0.5) / px * 2 - 1
    return HANDSHAPES[shape](u[None, :], u[:, None])  # (px, px) bool, rows are v


def _hand_px(signer: Signer, size: int) -> int:
    return max(3, int(round(SYNTH_HAND * signer.scale * size / SYNTH_CANVAS)))


@functools.lru_cache(maxsize=64)
def _signer_canvas(signer: Signer, size: int) -> np.ndarray:
    """Background plus a flat head and torso (constant over a clip): (H, W, 3) uint8."""
    k = size / SYNTH_CANVAS
    c = SYNTH_CANVAS / 2
    p = (np.arange(size) + 0.5) / k  # pixel centres on the 32-px canvas
    x = (p[None, :] - signer.dx - c) / signer.scale + c  # back to the signer's own coordinates
    y = (p[:, None] - signer.dy - c) / signer.scale + c
    head = np.hypot(x - BODY_CENTRE_X, y - 7.0) <= 4.5
    neck = (np.abs(x - BODY_CENTRE_X) <= 2) & (y >= 10) & (y <= 14)
    torso = (np.abs(x - BODY_CENTRE_X) <= 8) & (y >= 14)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = signer.background
    img[head | neck | torso] = signer.body
    img.flags.writeable = False
    return img


def _paste(frame: np.ndarray, mask: np.ndarray, cx: float, cy: float, colour) -> None:
    # Place the mask's centre at (cx, cy), clipped to the frame; rounding happens here only,
    # on each state by itself, so a reversed state list renders to the reversed frames.
    h, w = mask.shape
    top, left = int(np.rint(cy - h / 2)), int(np.rint(cx - w / 2))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, frame.shape[0]), min(left + w, frame.shape[1])
    if y1 > y0 and x1 > x0:
        frame[y0:y1, x0:x1][mask[y0 - top:y1 - top, x0 - left:x1 - left]] = colour


def _draw(signer: Signer, size: int, states: list, other: tuple) -> np.ndarray:
    """Frames for dominant-hand states [(shape, x, y)] (canvas coords) with the other hand
    resting at `other` (pixels): (T, H, W, 3) uint8."""
    px = _hand_px(signer, size)
    frames = np.repeat(_signer_canvas(signer, size)[None], len(states), axis=0)
    rest = _hand_mask(NEUTRAL_SHAPE, px)
    for f, (shape, x, y) in zip(frames, states):
        _paste(f, rest, other[0], other[1], signer.other_hand)
        _paste(f, _hand_mask(shape, px), *_to_pixels(signer, x, y, size), signer.hand)  # dominant on top
    return frames


def _mirror(signer: Signer, size: int, xs, ys) -> tuple:
    # The other hand rests at the mirror image (about the body's axis) of the dominant hand's
    # mean position: it tells where the sign is made, and, a mean being blind to order, not
    # which way it moves.
    axis = _to_pixels(signer, BODY_CENTRE_X, 0.0, size)[0]
    return 2 * axis - float(np.mean(xs)), float(np.mean(ys))


@functools.lru_cache(maxsize=1024)
def render_sign(gloss: str, signer: Signer, size: int = 32) -> np.ndarray:
    """Clean frames of one sign, (n, H, W, 3) uint8, n = sign_frames(signer). Read-only."""
    sign = SIGNS[gloss]
    states = _sign_path(SIGNS[sign.reverse_of] if sign.reverse_of else sign, sign_frames(signer))
    if sign.reverse_of:
        states = states[::-1]  # the minimal-pair partner: exactly the same states, backwards
    # Means of the rounded pixel positions: sums of integers, so the same in either order.
    px = _hand_px(signer, size)
    pos = [_to_pixels(signer, x, y, size) for _, x, y in states]
    xs = [np.rint(x - px / 2) + px / 2 for x, _ in pos]
    ys = [np.rint(y - px / 2) + px / 2 for _, y in pos]
    frames = _draw(signer, size, states, _mirror(signer, size, xs, ys))
    frames.flags.writeable = False
    return frames


@functools.lru_cache(maxsize=64)
def _rest_frame(signer: Signer, size: int) -> np.ndarray:
    # Between signs: the neutral shape at one fixed place, so transitions are the same frames
    # whatever the signs around them (a path's end points would otherwise show its direction).
    x, y = _to_pixels(signer, *REST, size)
    frame = _draw(signer, size, [(NEUTRAL_SHAPE, *REST)], _mirror(signer, size, [x], [y]))[0]
    frame.flags.writeable = False
    return frame


def render_clip(glosses, signer: Signer, rng: np.random.Generator, size: int = 32, noise: bool = True):
    """A sentence: neutral frames, then each sign followed by 3-4 neutral frames.

    Returns (frames (T, H, W, 3) uint8, segments [(gloss, start, stop)]). The transition
    lengths come from `rng` first, then the pixel noise (signer.noise std), so a clip with a
    gloss swapped for its partner draws the same timing and noise.
    """
    rest = _rest_frame(signer, size)
    parts, segments, t = [], [], 0
    lead = int(rng.integers(SYNTH_TRANSITION[0], SYNTH_TRANSITION[1] + 1))
    parts.append(np.repeat(rest[None], lead, axis=0))
    t += lead
    for g in glosses:
        sign = render_sign(g, signer, size)
        gap = int(rng.integers(SYNTH_TRANSITION[0], SYNTH_TRANSITION[1] + 1))
        parts += [sign, np.repeat(rest[None], gap, axis=0)]
        segments.append((g, t, t + len(sign)))
        t += len(sign) + gap
    frames = np.concatenate(parts)  # (T, H, W, 3)
    if noise:
        picks = rng.integers(0, SYNTH_NOISE_BANK, len(frames))
        frames = np.clip(frames + _signer_noise(signer, size)[picks], 0, 255).astype(np.uint8)
    return frames, segments


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    return np.random.default_rng([size, 4]).standard_normal((SYNTH_NOISE_BANK, size, size, 3), dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _signer_noise(signer: Signer, size: int) -> np.ndarray:
    # Gaussian pixel noise (std signer.noise), rounded: a fixed bank of frames that clips draw
    # from at random. Drawing fresh normals for every pixel cost more than encoding the clip.
    noise = np.rint(_noise_bank(size) * signer.noise).astype(np.int16)
    noise.flags.writeable = False
    return noise


# ---------------------------------------------------------------------------- grammar

# Spoken German, lowercased, as Phoenix-2014T translations are. Glosses of a word class can
# replace each other in every template, so context never tells minimal-pair partners apart.
SPOKEN = {
    "MONTAG": "am montag", "DIENSTAG": "am dienstag", "MITTWOCH": "am mittwoch",
    "DONNERSTAG": "am donnerstag", "FREITAG": "am freitag", "SAMSTAG": "am samstag",
    "SONNTAG": "am sonntag", "HEUTE": "heute", "MORGEN": "morgen",
    "VORMITTAG": "am vormittag", "NACHMITTAG": "am nachmittag", "ABEND": "am abend", "NACHT": "in der nacht",
    "NORD": "im norden", "SUED": "im süden", "WEST": "im westen", "OST": "im osten",
    "WARM": "warm", "KALT": "kalt", "STEIGEN": "steigen", "SINKEN": "sinken", "TEMPERATUR": "die temperaturen",
    "STARK": "deutlich", "LEICHT": "leicht",  # as adverbs (the temperature trend)
}
WEATHER_VERB = {
    "REGEN": "regnet es", "SCHNEE": "schneit es", "NEBEL": "ist es neblig", "FROST": "gibt es frost",
    "SONNE": "scheint die sonne", "WOLKE": "ist es bewölkt", "WIND": "ist es windig", "GEWITTER": "gibt es gewitter",
}
# "gibt es" + intensity + weather: the adjective agrees with the noun (accusative).
WEATHER_NOUN = {
    ("REGEN", "STARK"): "starken regen", ("REGEN", "LEICHT"): "leichten regen",
    ("SCHNEE", "STARK"): "starken schneefall", ("SCHNEE", "LEICHT"): "leichten schneefall",
    ("NEBEL", "STARK"): "dichten nebel", ("NEBEL", "LEICHT"): "leichten nebel",
    ("FROST", "STARK"): "strengen frost", ("FROST", "LEICHT"): "leichten frost",
    ("SONNE", "STARK"): "viel sonne", ("SONNE", "LEICHT"): "etwas sonne",
    ("WOLKE", "STARK"): "starke bewölkung", ("WOLKE", "LEICHT"): "leichte bewölkung",
    ("WIND", "STARK"): "starken wind", ("WIND", "LEICHT"): "schwachen wind",
    ("GEWITTER", "STARK"): "heftige gewitter", ("GEWITTER", "LEICHT"): "vereinzelte gewitter",
}


@dataclass(frozen=True)
class Template:
    """A sentence type: word classes in signing order, the spoken pattern, a sampling weight."""
    name: str
    slots: tuple
    pattern: str
    weight: float

    def combinations(self) -> list:
        return list(itertools.product(*(WORD_CLASSES[c] for c in self.slots)))


# Sign order is time, place, topic, comment (the intensity after what it modifies); the spoken
# order and the unsigned words ("gibt es", "wird es", "am", ...) differ.
TEMPLATES = [
    Template("forecast", ("DAY", "REGION", "WEATHER", "INTENSITY"), "{DAY} gibt es {REGION} {NOUN} .", 0.3),
    Template("weather", ("REGION", "DAY", "WEATHER"), "{DAY} {VERB} {REGION} .", 0.2),
    Template("daytime", ("DAY", "DAYTIME", "REGION", "WEATHER", "INTENSITY"),
             "{DAY} {DAYTIME} gibt es {REGION} {NOUN} .", 0.2),
    Template("temperature", ("DAY", "DAYTIME", "TEMPERATURE", "REGION"),
             "{DAY} wird es {DAYTIME} {REGION} {TEMPERATURE} .", 0.2),
    Template("trend", ("DAY", "REGION", "SUBJECT", "TREND", "INTENSITY"),
             "{DAY} {TREND} {SUBJECT} {REGION} {INTENSITY} .", 0.1),
]


def spoken_sentence(template: Template, glosses) -> str:
    """The spoken sentence of a gloss combination of `template`."""
    by_class = dict(zip(template.slots, glosses))
    words = {c: SPOKEN.get(g, "") for c, g in by_class.items()}
    if "WEATHER" in by_class:
        words["VERB"] = WEATHER_VERB[by_class["WEATHER"]]
        if "INTENSITY" in by_class:
            words["NOUN"] = WEATHER_NOUN[by_class["WEATHER"], by_class["INTENSITY"]]
    return template.pattern.format(**words)


# ---------------------------------------------------------------------------- splits and corpus

def _pick_template(rng, templates):
    w = np.array([t.weight for t in templates])
    return templates[int(rng.choice(len(templates), p=w / w.sum()))]


def plan_synthetic(seed: int = 0, n_train: int = 3000, n_dev: int = 200, n_test: int = 300,
                   n_corpus: int = 4000, n_signers: int = 8) -> dict:
    """Which clips to render and the corpus, without rendering: deterministic for a seed.

    Dev and test get gloss combinations of their own (at most 40% of any template's); train
    draws from the rest, first one clip per gloss so that every gloss is seen in training.
    Returns {"signers", "splits": {split: [clip]}, "corpus": [row]}; a clip is a dict of
    id, glosses, template, signer (index), text.
    """
    for name, n in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test), ("n_corpus", n_corpus)):
        if n < 0:
            raise ValueError(f"synthetic data: {name}={n}; give a count >= 0")
    if n_signers < 1:
        raise ValueError(f"synthetic data: n_signers={n_signers}; give at least 1")
    rng = np.random.default_rng([seed, 0])
    signers = make_signers(seed, n_signers)
    pools = {}
    for t in TEMPLATES:
        combos = t.combinations()
        pools[t.name] = [combos[i] for i in rng.permutation(len(combos))]
    cap = {t.name: int(SYNTH_HELDOUT_CAP * len(pools[t.name])) for t in TEMPLATES}
    n_held = {t.name: 0 for t in TEMPLATES}

    def clip(split, i, template, glosses):
        return {"id": f"{split}_{i:05d}", "glosses": tuple(glosses), "template": template.name,
                "signer": int(rng.integers(n_signers)), "text": spoken_sentence(template, glosses)}

    splits = {}
    for split, n in (("test", n_test), ("dev", n_dev)):  # held-out combinations come off the pools' front
        rows = []
        for i in range(n):
            open_ = [t for t in TEMPLATES if n_held[t.name] < cap[t.name]]
            if not open_:
                raise ValueError(f"synthetic data: n_dev + n_test = {n_dev + n_test} exceeds the "
                                 f"{sum(cap.values())} held-out combinations the grammar has; ask for fewer")
            t = _pick_template(rng, open_)
            rows.append(clip(split, i, t, pools[t.name][n_held[t.name]]))
            n_held[t.name] += 1
        splits[split] = rows
    train_pool = {t.name: pools[t.name][n_held[t.name]:] for t in TEMPLATES}

    # Every gloss in training: one clip for each gloss not yet covered, then weighted draws.
    chosen = []
    for g in SIGNS:
        if any(g in c for _, c in chosen):
            continue
        fits = [t for t in TEMPLATES if SIGNS[g].word_class in t.slots]
        t = _pick_template(rng, fits)
        options = [c for c in train_pool[t.name] if g in c]
        chosen.append((t, options[int(rng.integers(len(options)))]))
    if len(chosen) > n_train:
        raise ValueError(f"synthetic data: n_train={n_train} cannot show all {len(SIGNS)} glosses; "
                         f"give n_train >= {len(chosen)}")
    while len(chosen) < n_train:
        t = _pick_template(rng, TEMPLATES)
        chosen.append((t, train_pool[t.name][int(rng.integers(len(train_pool[t.name])))]))
    order = rng.permutation(len(chosen))
    splits["train"] = [clip("train", i, *chosen[j]) for i, j in enumerate(order)]

    # CPT corpus: gloss-text pairs of every training combination, then of unused ones (never
    # dev/test's), and plain sentences of the same grammar; shuffled together.
    by_name = {t.name: t for t in TEMPLATES}
    n_pairs = int(round(SYNTH_PAIR_SHARE * n_corpus))
    pairs, seen = [], set()
    for c in splits["train"]:
        if c["glosses"] not in seen and len(pairs) < n_pairs:
            seen.add(c["glosses"])
            pairs.append((by_name[c["template"]], c["glosses"]))
    unused = {t.name: [c for c in train_pool[t.name] if c not in seen] for t in TEMPLATES}
    while len(pairs) < n_pairs and any(unused.values()):
        t = _pick_template(rng, [t for t in TEMPLATES if unused[t.name]])
        pairs.append((t, unused[t.name].pop(int(rng.integers(len(unused[t.name]))))))
    corpus = [{"gloss": " ".join(c), "text": spoken_sentence(t, c)} for t, c in pairs]
    for _ in range(n_corpus - len(corpus)):
        t = _pick_template(rng, TEMPLATES)
        corpus.append({"text": spoken_sentence(t, train_pool[t.name][int(rng.integers(len(train_pool[t.name])))])})
    corpus = [corpus[i] for i in rng.permutation(len(corpus))]
    return {"signers": signers, "splits": {s: splits[s] for s in ("train", "dev", "test")}, "corpus": corpus}


# ---------------------------------------------------------------------------- writing

def _write_mp4(path, frames: np.ndarray, fps: int = SYNTH_FPS, crf: int = SYNTH_CRF) -> None:
    """(T, H, W, 3) uint8 -> H.264 mp4 in yuv444p (yuv420p halves the chroma resolution and
    smears shapes a few pixels wide).

    The same frames must give the same bytes in any process, whatever it encoded before:
    one thread (no dependence on the machine's cores), and no lookahead and no macroblock
    tree (`rc-lookahead=0:mbtree=0`). With x264's lookahead on, about one clip in ten of a
    long run in one process came out different from a fresh process, even single-threaded."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": SYNTH_X264_PARAMS}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())


def _clip_rng(seed: int, clip_id: str) -> np.random.Generator:
    # Per clip, from the seed and the id alone: the same frames whichever worker renders it.
    split, i = clip_id.rsplit("_", 1)
    return np.random.default_rng([seed, 2, ("train", "dev", "test").index(split), int(i)])


def _render_job(job) -> int:
    path, glosses, signer, size, seed, clip_id = job
    frames, _ = render_clip(glosses, signer, _clip_rng(seed, clip_id), size)
    _write_mp4(path, frames)
    return len(frames)


SYNTH_NAMES = {"videos", "train.jsonl", "dev.jsonl", "test.jsonl", "corpus.jsonl", "meta.json"}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file; give a folder path for --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: folder exists and is not empty; pass --overwrite=true to replace it "
                                  "or choose another --out")
        # --overwrite replaces only a synthetic dataset this command wrote, never a user's folder
        other = sorted({p.name for p in out.iterdir()} - SYNTH_NAMES)
        if not (out / "meta.json").is_file() or other:
            raise FileExistsError(f"{out}: not a synthetic dataset written by data.py synth "
                                  f"({'it holds ' + other[0] if other else 'no meta.json'}); --overwrite replaces "
                                  "only those: choose another --out")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def synthesize(out, seed: int = 0, n_train: int = 3000, n_dev: int = 200, n_test: int = 300, size: int = 32,
               n_corpus: int = 4000, n_signers: int = 8, workers: int = 2, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Render the synthetic sign language into `out` and return its meta.json content.

    Writes OUT/videos/{id}.mp4, OUT/{train,dev,test}.jsonl (rows id, video, text, gloss,
    signer; video relative to the manifest), OUT/corpus.jsonl (CPT: {"gloss", "text"} pairs and
    {"text"} sentences) and OUT/meta.json. Everything is written to a temporary folder beside
    `out` and renamed at the end, so a failure leaves nothing behind. Deterministic for a seed
    (same manifest/corpus bytes, same decoded frames).
    """
    out = Path(out)
    _check_out(out, overwrite)
    if size < 16:  # H.264 macroblocks are 16 px
        raise ValueError(f"synthetic data: size={size}; give size >= 16")
    plan = plan_synthetic(seed, n_train, n_dev, n_test, n_corpus, n_signers)
    signers = plan["signers"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "videos").mkdir(parents=True)
        clips = [c for rows in plan["splits"].values() for c in rows]
        jobs = [(str(tmp / "videos" / f"{c['id']}.mp4"), c["glosses"], signers[c["signer"]], size, seed, c["id"])
                for c in clips]
        pool, results = None, map(_render_job, jobs)
        if workers > 1 and len(jobs) > 1:
            # fork: the workers need no re-import (data.py imports torch); they use numpy and av only.
            fork = "fork" in multiprocessing.get_all_start_methods()
            pool = multiprocessing.get_context("fork" if fork else None).Pool(workers)
            results = pool.imap(_render_job, jobs, chunksize=16)  # in job order, whoever renders a clip
        try:
            n_frames = list(tqdm(results, total=len(jobs), desc=f"rendering {out}", unit="clip",
                                 disable=not progress))
        finally:
            if pool is not None:
                pool.terminate()
        for split, rows in plan["splits"].items():
            _write_jsonl(tmp / f"{split}.jsonl", [
                {"id": c["id"], "video": f"videos/{c['id']}.mp4", "text": c["text"], "gloss": " ".join(c["glosses"]),
                 "signer": signers[c["signer"]].name} for c in rows])
        _write_jsonl(tmp / "corpus.jsonl", plan["corpus"])
        meta = _meta(plan, seed, size, n_frames)
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
            f.write("\n")
        _check_out(out, overwrite)  # again: something may have appeared while rendering
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _meta(plan: dict, seed: int, size: int, n_frames: list) -> dict:
    corpus = plan["corpus"]
    return {
        "seed": seed, "language": "German", "size": size, "fps": SYNTH_FPS,
        "counts": {**{s: len(r) for s, r in plan["splits"].items()},
                   "corpus_pairs": sum("gloss" in r for r in corpus),
                   "corpus_sentences": sum("gloss" not in r for r in corpus)},
        "glosses": [{"gloss": s.gloss, "class": s.word_class, "movement": s.movement, "shapes": list(s.shapes),
                     "locations": list(s.locations), "reverse_of": s.reverse_of} for s in LEXICON],
        "word_classes": WORD_CLASSES,
        "minimal_pairs": [list(p) for p in MINIMAL_PAIRS],
        "templates": [{"name": t.name, "slots": list(t.slots), "pattern": t.pattern, "weight": t.weight,
                       "combinations": len(t.combinations())} for t in TEMPLATES],
        "timing": {"sign_frames_at_speed_1": SYNTH_SIGN_FRAMES,
                   "sign_frames_by_signer": {s.name: sign_frames(s) for s in plan["signers"]},
                   "transition_frames": list(SYNTH_TRANSITION),
                   "mean_frames_per_clip": round(float(np.mean(n_frames)), 3) if n_frames else 0.0,
                   "total_frames": int(np.sum(n_frames))},
        "signers": [{k: list(v) if isinstance(v, tuple) else v for k, v in vars(s).items()} for s in plan["signers"]],
        "video": {"codec": "libx264", "pix_fmt": "yuv444p", "crf": SYNTH_CRF, "x264_params": SYNTH_X264_PARAMS},
    }


# ---------------------------------------------------------------------------- command line

def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {s!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="data.py", description="Data tools of llava-slt.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="render the synthetic sign language (videos, manifests, CPT corpus)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_dev", type=int, default=200)
    p.add_argument("--n_test", type=int, default=300)
    p.add_argument("--n_corpus", type=int, default=4000)
    p.add_argument("--n_signers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        meta = synthesize(args.out, seed=args.seed, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test,
                          size=args.size, n_corpus=args.n_corpus, n_signers=args.n_signers,
                          workers=args.workers, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"data.py synth: {e}", file=sys.stderr)
        return 1
    c = meta["counts"]
    print(f"wrote {args.out}: {c['train']} train / {c['dev']} dev / {c['test']} test clips "
          f"({meta['timing']['mean_frames_per_clip']:.1f} frames each), {c['corpus_pairs']} gloss-text pairs "
          f"+ {c['corpus_sentences']} sentences, {len(LEXICON)} glosses, in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
