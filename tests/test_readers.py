"""Tests for readers.py: videos and frame folders, manifests, Phoenix-2014T, CSL-Daily, the corpus."""

import json
import re

import av
import numpy as np
import pytest
from PIL import Image

from errors import DataError
from readers import (dataset_kind, language_of, load_rows, read_corpus, read_csl_daily, read_manifest,
                     read_phoenix, read_video)

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [0, 255, 255], [255, 0, 255], [128, 128, 128], [20, 200, 90]], np.uint8)


def write_mp4(path, frames, rate=25):
    """Lossless H.264 in yuv444p (no chroma subsampling), so colours come back nearly exact."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt, s.options = "yuv444p", {"crf": "0"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


def colour_clip(n=8, size=32):
    return np.broadcast_to(COLOURS[np.arange(n) % len(COLOURS), None, None, :], (n, size, size, 3)).copy()


def write_frames(folder, values, name="images{:04d}.png", size=(6, 5)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(values):
        Image.fromarray(np.full(size + (3,), v, np.uint8)).save(folder / name.format(i + 1))
    return folder


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


# ---------------------------------------------------------------------------- video io

def test_read_mp4_colours(tmp_path):
    clip = colour_clip()
    frames = read_video(write_mp4(tmp_path / "c.mp4", clip))
    assert frames.dtype == np.uint8 and frames.shape == (8, 32, 32, 3)
    # yuv444p round trip: a few levels of colour-space rounding, no smearing
    assert np.abs(frames.astype(int) - clip.astype(int)).max() <= 3
    picked = read_video(tmp_path / "c.mp4", sample=lambda n: [n - 1, 2, 2])  # only these become RGB
    assert np.array_equal(picked, frames[[7, 2, 2]])
    mkv = read_video(write_mp4(tmp_path / "c.mkv", clip))  # any container PyAV reads
    assert mkv.shape == (8, 32, 32, 3) and np.abs(mkv.astype(int) - clip.astype(int)).max() <= 3


def test_read_frame_folder_natural_sort(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in [10, 2, 1, 100, 9]:  # written out of order; lexicographic order would be 1,10,100,2,9
        Image.fromarray(np.full((4, 6, 3), i, np.uint8)).save(folder / f"images{i:d}.png")
    (folder / "notes.txt").write_text("not a frame")
    frames = read_video(folder)
    assert frames.shape == (5, 4, 6, 3)
    assert frames[:, 0, 0, 0].tolist() == [1, 2, 9, 10, 100]
    picked = read_video(folder, sample=lambda n: [0, n - 1])  # only the picked frames are read
    assert picked[:, 0, 0, 0].tolist() == [1, 100]


def test_read_jpg_folder(tmp_path):
    folder = tmp_path / "S000000_P0000_T00"
    folder.mkdir()
    for i in [123, 9, 45]:
        Image.fromarray(np.full((16, 16, 3), 2 * i, np.uint8)).save(folder / f"{i:06d}.jpg", quality=95)
    frames = read_video(folder)
    assert np.abs(frames[:, 8, 8, 0].astype(int) - [18, 90, 246]).max() <= 2


def test_read_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.mp4"))) as e:
        read_video(tmp_path / "nope.mp4")
    assert one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no frames") as e:
        read_video(tmp_path / "empty")
    assert one_line(e)
    good = write_mp4(tmp_path / "good.mp4", colour_clip(8)).read_bytes()
    (tmp_path / "half.mp4").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"half\.mp4: cannot decode video .*corrupt or truncated") as e:
        read_video(tmp_path / "half.mp4")
    assert one_line(e)
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"junk\.mp4: cannot decode video") as e:
        read_video(tmp_path / "junk.mp4")
    assert one_line(e)
    folder = write_frames(tmp_path / "bad", [1, 2])
    (folder / "images0003.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"images0003\.png: unreadable image") as e:
        read_video(folder)
    assert one_line(e)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "images0003.png")
    png = (folder / "images0003.png").read_bytes()
    (folder / "images0003.png").write_bytes(png[: len(png) // 2])  # truncated
    with pytest.raises(DataError, match=r"images0003\.png: unreadable image"):
        read_video(folder)
    Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(folder / "images0003.png")
    with pytest.raises(DataError, match=r"images0003\.png: frame of size \(7, 5\), the clip's first frame is \(6, 5\)"):
        read_video(folder)


def test_read_npy_clip(tmp_path):
    """A .npy clip (the demo's format) reads back exactly, sampled like a video; bad arrays are one line."""
    clip = colour_clip(8)
    np.save(tmp_path / "clip.npy", clip)
    assert np.array_equal(read_video(tmp_path / "clip.npy"), clip)
    assert np.array_equal(read_video(tmp_path / "clip.npy", sample=lambda n: [0, n - 1]), clip[[0, 7]])
    np.save(tmp_path / "float.npy", clip.astype(np.float32))
    with pytest.raises(DataError, match=r"float\.npy: a \.npy clip must hold uint8 frames \(T, H, W, 3\) with T >= 1, "
                       r"got float32 \(8, 32, 32, 3\)") as e:
        read_video(tmp_path / "float.npy")
    assert one_line(e)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))  # a pickle inside: never loaded
    with pytest.raises(DataError, match=r"objects\.npy: unreadable \.npy clip") as e:
        read_video(tmp_path / "objects.npy")
    assert one_line(e)
    (tmp_path / "half.npy").write_bytes((tmp_path / "clip.npy").read_bytes()[:100])
    with pytest.raises(DataError, match=r"half\.npy: unreadable \.npy clip"):
        read_video(tmp_path / "half.npy")


# ---------------------------------------------------------------------------- dataset readers

PHOENIX_HEADER = "name|video|start|end|speaker|orth|translation"


def make_phoenix(root, split="dev", header=PHOENIX_HEADER):
    rows = [("01April_2010_Thursday_heute-6697", "Signer04", "REGEN TEIL GEWITTER",
             "und nun die wettervorhersage für morgen donnerstag den zweiten april"),
            ("11August_2010_Wednesday_tagesschau-2", "Signer08", "DRUCK TIEF KOMMEN",
             "tiefer luftdruck bestimmt in den nächsten tagen unser wetter")]
    ann = root / "annotations" / "manual"
    ann.mkdir(parents=True)
    lines = [header] + [f"{n}|{n}/1/*.png|-1|-1|{s}|{o}|{t}" for n, s, o, t in rows]
    (ann / f"PHOENIX-2014-T.{split}.corpus.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for n, *_ in rows:
        write_frames(root / "features" / "fullFrame-210x260px" / split / n, [1, 2, 3])
    return rows


def test_read_phoenix(tmp_path):
    rows = make_phoenix(tmp_path)
    got = read_phoenix(tmp_path, "dev")
    assert [r["id"] for r in got] == [r[0] for r in rows]
    assert got[1]["text"] == "tiefer luftdruck bestimmt in den nächsten tagen unser wetter"
    assert got[1]["gloss"] == "DRUCK TIEF KOMMEN" and got[1]["signer"] == "Signer08"
    assert got[0]["video"] == str(tmp_path / "features/fullFrame-210x260px/dev/01April_2010_Thursday_heute-6697")
    assert read_video(got[0]["video"]).shape == (3, 6, 5, 3)
    assert load_rows(tmp_path, "val") == got and dataset_kind(tmp_path) == "phoenix"
    assert language_of(tmp_path) == ("German", "word")


def test_read_phoenix_errors(tmp_path):
    make_phoenix(tmp_path / "a", header="name|video|start|end|speaker|orth")
    with pytest.raises(DataError, match=r"PHOENIX-2014-T\.dev\.corpus\.csv: header .* lacks column\(s\) translation") as e:
        read_phoenix(tmp_path / "a", "dev")
    assert one_line(e)
    with pytest.raises(FileNotFoundError, match=r"PHOENIX-2014-T\.train\.corpus\.csv"):
        read_phoenix(tmp_path / "a", "train")
    make_phoenix(tmp_path / "b")
    import shutil
    shutil.rmtree(tmp_path / "b/features/fullFrame-210x260px/dev/11August_2010_Wednesday_tagesschau-2")
    with pytest.raises(FileNotFoundError, match=r"corpus\.csv line 3: no frames folder .*tagesschau-2"):
        read_phoenix(tmp_path / "b", "dev")


def make_csl(root):
    lab = root / "sentence_label"
    lab.mkdir(parents=True)
    (lab / "split_1.txt").write_text("Name|split\nS000000_P0000_T00|train\nS000001_P0003_T00|dev\n"
                                     "S000002_P0001_T00|train\n", encoding="utf-8")
    (lab / "video_map.txt").write_text(
        "index|name|length|gloss|char|word|postag\n"
        "0|S000000_P0000_T00|44|他 的 同学 谁|他 的 同 学 是 谁 ？|他 的 同学 是 谁 ？|r u n v r w\n"
        "1|S000001_P0003_T00|60|我 累|我 累 了 。|我 累 了 。|r a u w\n"
        "2|S000002_P0001_T00|52|牛奶 咖啡 一起 喝|牛 奶 可 以 和 咖 啡 一 起 喝 。|牛奶 可以 和 咖啡 一起 喝 。|n v c n d v w\n",
        encoding="utf-8")
    (lab / "csl2020ct_v2.pkl").write_bytes(b"never unpickled")
    for n in ["S000000_P0000_T00", "S000001_P0003_T00", "S000002_P0001_T00"]:
        write_frames(root / "sentence" / "frames_512x512" / n, [5, 6], name="{:06d}.jpg")


def test_read_csl_daily(tmp_path):
    make_csl(tmp_path)
    got = read_csl_daily(tmp_path, "train")
    assert [r["id"] for r in got] == ["S000000_P0000_T00", "S000002_P0001_T00"]
    assert [r["text"] for r in got] == ["他的同学是谁？", "牛奶可以和咖啡一起喝。"]
    assert got[1]["gloss"] == "牛奶 咖啡 一起 喝" and [r["signer"] for r in got] == ["P0000", "P0001"]
    assert got[0]["video"] == str(tmp_path / "sentence/frames_512x512/S000000_P0000_T00")
    assert [r["text"] for r in load_rows(tmp_path, "dev")] == ["我累了。"]
    assert language_of(tmp_path) == ("Chinese", "char")


def test_read_csl_daily_errors(tmp_path):
    make_csl(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "sentence/frames_512x512/S000002_P0001_T00")
    with pytest.raises(FileNotFoundError, match=r"split_1\.txt line 4: no frames folder .*S000002_P0001_T00") as e:
        read_csl_daily(tmp_path, "train")
    assert one_line(e)
    (tmp_path / "sentence_label/split_1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split_1\.txt: CSL-Daily split file not found"):
        read_csl_daily(tmp_path, "dev")


def test_read_manifest_and_dispatch(tmp_path):
    write_frames(tmp_path / "clips" / "a", [1])
    write_mp4(tmp_path / "clips" / "b.mp4", colour_clip(2, 16))
    rows = [{"id": "a", "video": "clips/a", "text": " guten morgen ", "gloss": "MORGEN GUT"},
            {"video": "clips/b.mp4", "text": "gute nacht", "signer": "s1"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_rows(tmp_path, "train")
    assert got == [
        {"id": "a", "video": str(tmp_path / "clips/a"), "text": "guten morgen", "gloss": "MORGEN GUT", "signer": None},
        {"id": "b", "video": str(tmp_path / "clips/b.mp4"), "text": "gute nacht", "gloss": None, "signer": "s1"}]
    assert read_manifest(tmp_path / "train.jsonl") == got and load_rows(tmp_path / "train.jsonl", "test") == got
    assert language_of(tmp_path) == ("German", "word")
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl: no manifest for split 'test'"):
        load_rows(tmp_path, "test")
    zh = tmp_path / "zh.jsonl"
    zh.write_text(json.dumps({"video": "clips/a", "text": "他的同学是谁？"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert language_of(zh) == ("Chinese", "char")


@pytest.mark.parametrize("line, match", [
    ('{"id": "x", "video": "a"}', r"m\.jsonl row 2: no text or empty 'text'"),
    ('{"id": "x", "video": "a", "text": "  "}', r"m\.jsonl row 2: no text or empty 'text'"),
    ('{"id": "x", "video": "a", "text": "hallo"', r"m\.jsonl row 2: bad json"),
    ('{"id": "x", "text": "hallo"}', r"m\.jsonl row 2: no 'video'"),
    ('{"id": "ok", "video": "a", "text": "hallo"}', r"m\.jsonl row 2: id 'ok' already used in row 1"),
    ('{"id": "y", "video": "missing.mp4", "text": "hallo"}', r"m\.jsonl row 2: video .*missing\.mp4 not found"),
])
def test_read_manifest_errors(tmp_path, line, match):
    write_frames(tmp_path / "a", [1])
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "ok", "video": "a", "text": "gut"}) + "\n" + line + "\n")
    with pytest.raises((DataError, FileNotFoundError), match=match) as e:
        read_manifest(tmp_path / "m.jsonl")
    assert one_line(e)


def test_non_utf8_bytes_name_the_file_and_row(tmp_path):
    write_frames(tmp_path / "a", [1])
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"id": "ok", "video": "a", "text": "gut"}\n{"id": "x", "video": "a", "text": "gr\xfc\xdf"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl row 2: not UTF-8 \(byte b'\\xfc' at column 38\); save the file "
                                        r"as UTF-8") as e:
        read_manifest(m)
    assert one_line(e)
    c = tmp_path / "c.jsonl"
    c.write_bytes(b'{"text": "gut"}\n\n{"text": "\xe4"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl row 3: not UTF-8"):
        read_corpus(c)


def test_read_corpus(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "am montag regen ."}\n{"gloss": "MONTAG REGEN", "text": "am montag regen ."}\n')
    assert read_corpus(p) == [{"text": "am montag regen ."}, {"gloss": "MONTAG REGEN", "text": "am montag regen ."}]
    p.write_text('{"text": "gut"}\n{"gloss": "X"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl row 2: no text"):
        read_corpus(p)
