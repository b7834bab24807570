"""A small invented sign language for the demo and the tests (off the reading path).

    python synth.py --out DIR [--seed 0 --n_train 3000 --n_dev 200 --n_test 300 ...]

Weather-forecast glosses rendered as a dominant hand (shape x location x movement) in front
of a flat signer, written as real mp4 files (or, `--video_format=npy`, the decoded frames as
.npy arrays: the demo's fast path) plus manifests, a CPT text corpus and meta.json.
It is built so that each of the three stages has something to learn:
- most glosses come in minimal pairs whose second member is the first played backwards, so
  no single frame and no bag of frames tells them apart: only frame order does (the local
  attention of the hierarchical encoder);
- the spoken sentence reorders the glosses and adds unsigned words, and dev/test use gloss
  combinations that never occur in training: translating needs the grammar (CPT), not memory.
"""

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from errors import UserError

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
            raise UserError(f"synthetic data: {name}={n}; give a count >= 0")
    if n_signers < 1:
        raise UserError(f"synthetic data: n_signers={n_signers}; give at least 1")
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
                raise UserError(f"synthetic data: n_dev + n_test = {n_dev + n_test} exceeds the "
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
        raise UserError(f"synthetic data: n_train={n_train} cannot show all {len(SIGNS)} glosses; "
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
    if path.endswith(".npy"):
        np.save(path, frames)
    else:
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
            raise FileExistsError(f"{out}: not a synthetic dataset written by synth.py "
                                  f"({'it holds ' + other[0] if other else 'no meta.json'}); --overwrite replaces "
                                  "only those: choose another --out")


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def synthesize(out, seed: int = 0, n_train: int = 3000, n_dev: int = 200, n_test: int = 300, size: int = 32,
               n_corpus: int = 4000, n_signers: int = 8, workers: int = 2, overwrite: bool = False,
               progress: bool = True, video_format: str = "mp4") -> dict:
    """Render the synthetic sign language into `out` and return its meta.json content.

    Writes OUT/videos/{id}.mp4 (or .npy: the frames as they are, lossless, written and read in
    a fraction of a millisecond instead of ~17 ms to encode and ~4 ms to decode: the demo's
    choice), OUT/{train,dev,test}.jsonl (rows id, video, text, gloss,
    signer; video relative to the manifest), OUT/corpus.jsonl (CPT: {"gloss", "text"} pairs and
    {"text"} sentences) and OUT/meta.json. Everything is written to a temporary folder beside
    `out` and renamed at the end, so a failure leaves nothing behind. Deterministic for a seed
    (same manifest/corpus bytes, same decoded frames).
    """
    out = Path(out)
    _check_out(out, overwrite)
    if video_format not in ("mp4", "npy"):
        raise UserError(f"synthetic data: video_format={video_format!r}; give mp4 or npy")
    if size < 16 and video_format == "mp4":  # H.264 macroblocks are 16 px
        raise UserError(f"synthetic data: size={size}; give size >= 16")
    plan = plan_synthetic(seed, n_train, n_dev, n_test, n_corpus, n_signers)
    signers = plan["signers"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "videos").mkdir(parents=True)
        clips = [c for rows in plan["splits"].values() for c in rows]
        jobs = [(str(tmp / "videos" / f"{c['id']}.{video_format}"), c["glosses"], signers[c["signer"]], size, seed, c["id"])
                for c in clips]
        pool, results = None, map(_render_job, jobs)
        if workers > 1 and len(jobs) > 1:
            # fork: the workers need no re-import; they use numpy and av only.
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
                {"id": c["id"], "video": f"videos/{c['id']}.{video_format}", "text": c["text"], "gloss": " ".join(c["glosses"]),
                 "signer": signers[c["signer"]].name} for c in rows])
        _write_jsonl(tmp / "corpus.jsonl", plan["corpus"])
        meta = _meta(plan, seed, size, n_frames, video_format)
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


def _meta(plan: dict, seed: int, size: int, n_frames: list, video_format: str = "mp4") -> dict:
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
        "video": {"format": "npy", "dtype": "uint8", "shape": "(T, H, W, 3)"} if video_format == "npy" else
                 {"format": "mp4", "codec": "libx264", "pix_fmt": "yuv444p", "crf": SYNTH_CRF,
                  "x264_params": SYNTH_X264_PARAMS},
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
    p = argparse.ArgumentParser(prog="synth.py", description="Render the synthetic sign language of llava-slt "
                                "(videos, manifests, CPT corpus).")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=3000)
    p.add_argument("--n_dev", type=int, default=200)
    p.add_argument("--n_test", type=int, default=300)
    p.add_argument("--n_corpus", type=int, default=4000)
    p.add_argument("--n_signers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--video_format", choices=("mp4", "npy"), default="mp4",
                   help="mp4 (H.264, what real data looks like) or npy (decoded frames: fast, lossless)")
    p.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False)
    args = p.parse_args(argv)
    start = time.time()
    try:
        meta = synthesize(args.out, seed=args.seed, n_train=args.n_train, n_dev=args.n_dev, n_test=args.n_test,
                          size=args.size, n_corpus=args.n_corpus, n_signers=args.n_signers,
                          workers=args.workers, overwrite=args.overwrite, video_format=args.video_format)
    except (ValueError, OSError) as e:
        print(f"synth.py: {e}", file=sys.stderr)
        return 1
    c = meta["counts"]
    print(f"wrote {args.out}: {c['train']} train / {c['dev']} dev / {c['test']} test clips "
          f"({meta['timing']['mean_frames_per_clip']:.1f} frames each), {c['corpus_pairs']} gloss-text pairs "
          f"+ {c['corpus_sentences']} sentences, {len(LEXICON)} glosses, in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
