"""Tests for doctor.py, `python data.py check`: planted faults are all found, named and counted."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import doctor
from test_readers import colour_clip, make_csl, make_phoenix, write_frames, write_mp4

ROOT = Path(__file__).resolve().parent.parent


def _manifest(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_faulty(root):
    """A manifest folder with one of each fault: a missing video, an empty frame folder, a
    0-byte and a truncated mp4, an empty sentence, a 12-frame clip (against --max_frames=10)."""
    (root / "videos").mkdir(parents=True)
    for name, n in (("a", 8), ("b", 6), ("c", 8)):
        write_mp4(root / "videos" / f"{name}.mp4", colour_clip(n, 16))
    good = (root / "videos" / "a.mp4").read_bytes()
    (root / "videos" / "corrupt.mp4").write_bytes(good[: len(good) // 2])
    (root / "videos" / "zero.mp4").write_bytes(b"")
    (root / "frames" / "empty_dir").mkdir(parents=True)
    write_frames(root / "frames" / "long", range(12))
    _manifest(root / "train.jsonl", [
        {"id": "a", "video": "videos/a.mp4", "text": "guten morgen"},
        {"id": "b", "video": "videos/b.mp4", "text": "am montag regen im norden"},
        {"id": "gone", "video": "videos/gone.mp4", "text": "regen"},
        {"id": "empty_dir", "video": "frames/empty_dir", "text": "regen"},
        {"id": "corrupt", "video": "videos/corrupt.mp4", "text": "regen"},
        {"id": "nosent", "video": "videos/c.mp4", "text": "  "},
        {"id": "long", "video": "frames/long", "text": "es bleibt trocken"},
        {"id": "zero", "video": "videos/zero.mp4", "text": "regen"}])
    _manifest(root / "dev.jsonl", [{"id": "d", "video": "videos/c.mp4", "text": "guten abend"}])


def run(argv, capsys):
    """(exit status, stdout, stderr) of `python data.py check ARGV`, in this process."""
    try:
        doctor.command(["check"] + argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_planted_faults_are_all_named_and_counted(tmp_path, capsys):
    make_faulty(tmp_path)
    code, out, _ = run([f"--data={tmp_path}", "--max_frames=10"], capsys)
    assert code == 1
    assert out == f"""dataset: {tmp_path} (a manifest; German: words)
train:
  rows: 8
  empty sentences: 1
    train.jsonl row 6 nosent
  missing media: 1
    gone videos/gone.mp4
  empty media: 2
    empty_dir frames/empty_dir
    zero videos/zero.mp4
  unreadable media: 1
    corrupt videos/corrupt.mp4: cannot decode video (Invalid data found when processing input)
  frames per clip (4 read): min 6 / median 8 / max 12
  clips longer than --max_frames=10: 1
    long 12 frames
  vocabulary: 10 words; sentence length in words: min 1 / median 1 / max 5
dev:
  rows: 1
  every row has a sentence and readable media
  frames per clip (1 read): min 8 / median 8 / max 8
  clips longer than --max_frames=10: 0
  vocabulary: 2 words (1 not in train); sentence length in words: min 2 / median 2 / max 2
result: 5 problem(s) stop training: empty sentences 1, missing media 1, empty media 2, unreadable media 1
"""
