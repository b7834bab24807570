"""Data for LLaVA-SLT (paper sections 4.1 and C).

Video reading (mp4 through PyAV, frame folders through Pillow), frame sampling, the clip
transforms, readers of the public dataset layouts into manifest rows, collate functions
with masks, the VLT prompt/label builder, CPT corpus packing. The synthetic sign language
of the demo and the tests is in synth.py.
"""

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

from losses import IGNORE_INDEX

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

    @property
    def in_memory(self) -> bool:  # decoded clips kept: read in the main process (training.loader_workers)
        return self.videos is not None

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
