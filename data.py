"""The data side of LLaVA-SLT (paper sections 3.3, 4.1 and C).

Frame sampling, the clip transforms with one random draw per clip, clips batched with masks,
the VLT chat prompt (task and format prompts, Tab. 8/9) with labels on the response only, and
CPT's packed blocks. Reading files (videos, manifests, Phoenix-2014T, CSL-Daily) is in
readers.py; the synthetic sign language of the demo and the tests is in synth.py.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from losses import IGNORE_INDEX
from errors import DataError, UserError
from readers import read_video

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- frames

def sample_indices(num_frames: int, max_frames=None, stride: int = 1, train: bool = False,
                   rng=None) -> np.ndarray:
    """Frame indices: every `stride`-th frame, then at most `max_frames` of them, spread uniformly.

    The strided sequence is cut into max_frames equal segments; eval takes each segment's
    centre (deterministic), train a random frame inside each segment (and a random stride phase).
    """
    if num_frames < 1:
        raise UserError(f"sample_indices: a clip needs at least one frame, got {num_frames}")
    if stride < 1:
        raise UserError(f"sample_indices: stride must be >= 1, got {stride}")
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
            raise UserError(f"VideoTransform: crop size {size} is larger than the resize {resize}")
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
    def in_memory(self) -> bool:  # decoded clips kept: read in the main process (loader.loader_workers)
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


def build_chat_example(tok, system, user, answer=None, visual_slot_id=None, max_length: int = 0,
                       clip: str = "") -> dict:
    """Token ids and labels of one chat turn: system, user, and (for training) the answer.

    `user` is text (gloss sequence, CPT) or an int n: n visual-token slots (VLT) filled with
    `visual_slot_id` (default the pad id), replaced by connector outputs inside the model.
    Segments are tokenised on their own and concatenated, so the slots and the answer sit at
    known positions. Labels are IGNORE_INDEX except the answer and the end-of-turn token.
    max_length > 0: a longer example stops here with one line naming `clip`, not past the LLM's positions.
    """
    is_visual = isinstance(user, (int, np.integer)) and not isinstance(user, bool)
    if answer is not None:
        answer = answer.strip()
        if not answer:
            raise UserError("build_chat_example: empty answer; every training example needs its target sentence")
    messages = [{"role": "system", "content": system}] if system is not None else []
    user_turn = {"role": "user", "content": _USER_SENTINEL}
    gen = tok.apply_chat_template(messages + [user_turn], add_generation_prompt=True, tokenize=False)
    if gen.count(_USER_SENTINEL) != 1:
        raise UserError("build_chat_example: the tokenizer's chat template does not copy the user "
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
            raise UserError("build_chat_example: the chat template renders the conversation with the "
                            "answer differently from the generation prompt; labels cannot be aligned")
        tail = full[len(gen):]
        if not tail.startswith(answer):
            raise UserError(f"build_chat_example: the chat template changed the answer text "
                            f"(rendered {tail[:60]!r}); use a template that copies it verbatim")
        answer_ids, end_ids = tok.encode(answer), tok.encode(tail[len(answer):])
        eos = set(tok.eos_token_ids)
        stop = next((k for k, t in enumerate(end_ids) if t in eos), None)
        if stop is None:
            raise UserError(f"build_chat_example: the assistant turn ends with {tail[len(answer):]!r}, "
                            f"which holds none of the tokenizer's eos ids {sorted(eos)}; fix the "
                            "tokenizer's eos tokens or generation would never stop")
        # supervise the answer and the end-of-turn token; what follows it (a newline) is not predicted
        input_ids = input_ids + answer_ids + end_ids
        labels = labels + answer_ids + end_ids[:stop + 1] + [IGNORE_INDEX] * (len(end_ids) - stop - 1)
    if max_length and len(input_ids) > max_length:
        raise DataError(f"clip {clip}: its prompt with {n_visual} visual tokens"
                        f"{' and its answer' if answer is not None else ''} is {len(input_ids)} tokens, more than the "
                        f"{max_length} positions the LLM has for it; lower --max_frames or raise --stride")
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


class CorpusDataset(torch.utils.data.Dataset):
    """Packed plain-text blocks (loss everywhere) followed by gloss-text chat examples (loss on
    the answer). Gloss repetition is drawn per (seed, epoch, index), so runs are reproducible."""

    def __init__(self, tok, rows, block_size, language, gloss_repeat, seed):
        plain = [r["text"] for r in rows if "gloss" not in r]
        self.blocks = pack_blocks(tok, plain, block_size) if plain else torch.zeros(0, block_size, dtype=torch.long)
        self.pairs = [r for r in rows if "gloss" in r]
        self.tok, self.system, self.repeat, self.seed, self.epoch = tok, system_prompt(language), gloss_repeat, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.blocks) + len(self.pairs)

    def __getitem__(self, i):
        if i < len(self.blocks):
            ids = self.blocks[i].tolist()
            return {"input_ids": ids, "labels": ids, "visual_start": None}
        pair = self.pairs[i - len(self.blocks)]
        glosses = pair["gloss"].split()
        if self.repeat > 1:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            glosses = [g for g in glosses for _ in range(rng.integers(1, self.repeat + 1))]
        return build_chat_example(self.tok, self.system, " ".join(glosses), answer=pair["text"])


if __name__ == "__main__":  # `python data.py check --data=ROOT`: the dataset doctor, in doctor.py
    import sys
    from doctor import command
    command(sys.argv[1:])
