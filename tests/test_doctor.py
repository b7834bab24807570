"""Tests for doctor.py, `python data.py check`: planted faults are all found, named and counted."""

import json
import runpy
import shutil
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
    empty_dir frames/empty_dir: no frame images
    zero videos/zero.mp4: 0 bytes
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


def test_header_counts_equal_decoded_counts(tmp_path, capsys):
    # --decode=false reads frame counts from the mp4 header and the folder's file names
    make_faulty(tmp_path)
    decoded = run([f"--data={tmp_path}", "--max_frames=10"], capsys)
    assert run([f"--data={tmp_path}", "--max_frames=10", "--decode=false"], capsys) == decoded


def test_clean_tree_exits_0_from_the_command_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "a.mp4", colour_clip(5, 16))
    write_frames(tmp_path / "frames" / "b", range(3))
    _manifest(tmp_path / "train.jsonl", [{"id": "a", "video": "videos/a.mp4", "text": "guten morgen"},
                                         {"id": "b", "video": "frames/b", "text": "gute nacht ."}])
    # data.py's own __main__, in this process (a new python would spend seconds importing torch)
    monkeypatch.setattr(sys, "argv", ["data.py", "check", f"--data={tmp_path}"])
    runpy.run_path(str(ROOT / "data.py"), run_name="__main__")  # returns: exit status 0
    p = capsys.readouterr()
    assert p.err == ""
    assert p.out == f"""dataset: {tmp_path} (a manifest; German: words)
train:
  rows: 2
  every row has a sentence and readable media
  frames per clip (2 read): min 3 / median 4 / max 5
  clips longer than --max_frames=256: 0
  vocabulary: 5 words; sentence length in words: min 2 / median 2.5 / max 3
result: nothing stops training
"""


def test_bad_rows_many_names_and_unreadable_manifests(tmp_path, capsys):
    write_frames(tmp_path / "ok", range(2))
    rows = [{"id": "ok", "video": "ok", "text": "hallo"}, {"id": "ok", "video": "ok", "text": "doppelt"},
            {"id": "novideo", "text": "hallo"}]
    _manifest(tmp_path / "train.jsonl", rows + [{"id": f"m{i:02d}", "video": f"m{i:02d}.mp4", "text": "weg"}
                                                for i in range(23)])
    (tmp_path / "dev.jsonl").write_text('{"id": "x", "video": "ok", "text": "hallo"}\n{"id": "y"\n')
    (tmp_path / "test.jsonl").write_bytes(b'{"id": "x", "video": "ok", "text": "gr\xfc\xdf"}\n')
    code, out, _ = run([f"--data={tmp_path}"], capsys)
    assert code == 1
    missing = "\n".join(f"    m{i:02d} m{i:02d}.mp4" for i in range(20))
    assert f"""train:
  rows: 24
  bad rows: 2
    train.jsonl row 2: id 'ok' already used in row 1
    train.jsonl row 3: no 'video'
  missing media: 23
{missing}
    ... and 3 more
  frames per clip (1 read): min 2 / median 2 / max 2
""" in out
    assert f"""dev:
  unreadable manifest: 1
    {tmp_path}/dev.jsonl row 2: bad json (Expecting ',' delimiter); write one JSON object per line
test:
  unreadable manifest: 1
    {tmp_path}/test.jsonl row 1: not UTF-8 (byte b'\\xfc' at column 39); save the file as UTF-8
result: 27 problem(s) stop training: unreadable manifest 2, bad rows 2, missing media 23
""" in out


def _phoenix_all_splits(root):
    make_phoenix(root, "dev")
    csv = root / "annotations" / "manual" / "PHOENIX-2014-T.dev.corpus.csv"
    for split in ("train", "test"):
        shutil.copy(csv, csv.with_name(f"PHOENIX-2014-T.{split}.corpus.csv"))
        shutil.copytree(root / "features/fullFrame-210x260px/dev", root / f"features/fullFrame-210x260px/{split}")


def test_phoenix_against_the_published_counts(tmp_path, capsys, monkeypatch):
    _phoenix_all_splits(tmp_path)
    code, out, _ = run([f"--data={tmp_path}"], capsys)
    assert code == 0 and out.startswith(f"dataset: {tmp_path} (Phoenix-2014T; German: words)\ntrain:\n")
    assert "  rows: 2, published 7096 (Phoenix-2014T): 7094 fewer\n" in out
    assert "  rows: 2, published 519 (Phoenix-2014T): 517 fewer\n" in out
    assert "  rows: 2, published 642 (Phoenix-2014T): 640 fewer\n" in out
    assert out.count("  frames per clip (2 read): min 3 / median 3 / max 3\n") == 3
    assert "  vocabulary: 18 words (0 not in train); sentence length in words: min 9 / median 9.5 / max 10\n" in out
    monkeypatch.setitem(doctor.PUBLISHED, "phoenix", ("Phoenix-2014T", {"train": 2, "dev": 1, "test": 2}))
    out = run([f"--data={tmp_path}"], capsys)[1]
    assert out.count(", published 2 (Phoenix-2014T): matches\n") == 2 and "published 1 (Phoenix-2014T): 1 more" in out
    # a lost annotation file stops training; so does a lost frames folder, named by its clip
    (tmp_path / "annotations/manual/PHOENIX-2014-T.test.corpus.csv").unlink()
    shutil.rmtree(tmp_path / "features/fullFrame-210x260px/train/11August_2010_Wednesday_tagesschau-2")
    code, out, _ = run([f"--data={tmp_path}"], capsys)
    assert code == 1 and f"""test:
  unreadable manifest: 1
    {tmp_path}/annotations/manual/PHOENIX-2014-T.test.corpus.csv: Phoenix-2014T annotation file not found; check the dataset root
""" in out
    assert ("  missing media: 1\n    11August_2010_Wednesday_tagesschau-2 "
            "features/fullFrame-210x260px/train/11August_2010_Wednesday_tagesschau-2\n") in out


def test_csl_daily_counts_characters(tmp_path, capsys):
    make_csl(tmp_path)
    code, out, _ = run([f"--data={tmp_path}"], capsys)
    # train: 他的同学是谁？ (7) and 牛奶可以和咖啡一起喝。 (11): 18 characters, all distinct
    assert out.startswith(f"dataset: {tmp_path} (CSL-Daily; Chinese: characters)\ntrain:\n"
                          "  rows: 2, published 18401 (CSL-Daily): 18399 fewer\n")
    assert "  vocabulary: 18 characters; sentence length in characters: min 7 / median 9 / max 11\n" in out
    # dev: 我累了。: 我, 累 and 了 are new, 。 is not
    assert ("  vocabulary: 4 characters (3 not in train); sentence length in characters: min 4 / median 4 / max 4\n"
            in out)
    assert code == 1 and "test:\n  unreadable manifest: 1\n" in out and "no rows for split 'test'" in out


@pytest.mark.parametrize("argv, match", [
    ([], "--data is required"), (["--data=."], "no train.jsonl"), (["--data=x", "--max_frames=0"], "--max_frames=0"),
    (["--frames=3"], "unknown option --frames")])
def test_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n')  # a folder with a jsonl but no split
    code, out, err = run(argv, capsys)
    assert code == 1 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_a_bad_frame_inside_a_folder(tmp_path, capsys):
    folder = write_frames(tmp_path / "clip", range(3))
    (folder / "images0002.png").write_bytes(b"\x89PNG not really")
    _manifest(tmp_path / "train.jsonl", [{"id": "clip", "video": "clip", "text": "hallo"}])
    code, out, _ = run([f"--data={tmp_path}"], capsys)
    assert code == 1 and "  unreadable media: 1\n    clip clip: images0002.png: unreadable image (cannot identify" \
        in out
    # counting file names alone cannot see it: the price of --decode=false
    code, out, _ = run([f"--data={tmp_path}", "--decode=false"], capsys)
    assert code == 0 and "  frames per clip (1 read): min 3 / median 3 / max 3\n" in out


def test_npy_clips_are_counted_and_bad_ones_named(tmp_path, capsys):
    """The demo's .npy clips (synth.py --video_format=npy): counted with and without --decode, a
    float array is unreadable media like a corrupt video."""
    import numpy as np
    (tmp_path / "videos").mkdir()
    np.save(tmp_path / "videos" / "a.npy", colour_clip(7, 16))
    np.save(tmp_path / "videos" / "b.npy", colour_clip(3, 16).astype(np.float32))
    _manifest(tmp_path / "train.jsonl", [{"id": "a", "video": "videos/a.npy", "text": "guten morgen"},
                                         {"id": "b", "video": "videos/b.npy", "text": "gute nacht"}])
    for decode in ("true", "false"):
        code, out, _ = run([f"--data={tmp_path}", f"--decode={decode}"], capsys)
        assert code == 1 and "result: 1 problem(s) stop training: unreadable media 1" in out, out
        assert "  unreadable media: 1\n    b videos/b.npy: a .npy clip must hold uint8 frames" in out, out
        assert "frames per clip (1 read): min 7 / median 7 / max 7" in out, out
