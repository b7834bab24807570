"""Tests for data.py: video io, transforms, readers, collate, prompts, corpus, synthetic language."""

# ============================================================================ core

import json
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (IMAGENET_MEAN, IMAGENET_STD, ClipAugment, ClipDataset, DataError, VideoTransform,
                  collate_clips, dataset_kind, language_of, load_rows, read_corpus, read_csl_daily,
                  read_manifest, read_phoenix, read_video, sample_indices, system_prompt)

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


# ---------------------------------------------------------------------------- sampling

def test_sample_indices_eval_and_stride():
    assert sample_indices(100, 10).tolist() == list(range(5, 100, 10))  # segment centres
    assert sample_indices(7, 10).tolist() == list(range(7))  # short clips are kept whole
    assert sample_indices(10, None, stride=3).tolist() == [0, 3, 6, 9]
    assert sample_indices(40, 5, stride=2).tolist() == [4, 12, 20, 28, 36]  # stride first, then centres
    assert sample_indices(11, 10).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_sample_indices_train_random_within_segments():
    draws = [sample_indices(100, 10, train=True, rng=np.random.default_rng(s)) for s in range(20)]
    for idx in draws:
        assert ((idx // 10) == np.arange(10)).all()  # one frame inside each segment of 10
    assert len({tuple(d) for d in draws}) == 20
    again = sample_indices(100, 10, train=True, rng=np.random.default_rng(3))
    assert again.tolist() == draws[3].tolist()
    for s in range(10):  # 5 of 7 frames: segments [0,1) [1,2) [2,4) [4,5) [5,7)
        idx = sample_indices(7, 5, train=True, rng=np.random.default_rng(s))
        assert idx[:2].tolist() == [0, 1] and idx[2] in (2, 3) and idx[3] == 4 and idx[4] in (5, 6)
    phases = {int(sample_indices(30, None, stride=3, train=True, rng=np.random.default_rng(s))[0])
              for s in range(20)}
    assert phases == {0, 1, 2}  # random stride phase in training


# ---------------------------------------------------------------------------- transforms

def _pixels(out):  # normalised (T, 3, H, W) -> 0..255 values
    return (out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255


def test_transform_normalisation_values():
    clip = np.broadcast_to(np.array([255, 0, 128], np.uint8), (3, 10, 14, 3)).copy()
    out = VideoTransform(size=8, resize=12)(clip)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 8, 8)
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_transform_eval_centre_square_and_crop():
    # value = column index; a 40x48 frame keeps columns 4..43 as its centre square
    clip = np.broadcast_to(np.arange(48, dtype=np.uint8)[None, None, :, None], (2, 40, 48, 3)).copy()
    out = VideoTransform(size=40, resize=40)(clip)
    torch.testing.assert_close(_pixels(out)[0, 0, 0], torch.arange(4, 44).float(), atol=1e-3, rtol=0)
    out = VideoTransform(size=20, resize=40)(clip)  # centre crop: columns 10..29 of the square
    torch.testing.assert_close(_pixels(out)[1, 2, 5], torch.arange(14, 34).float(), atol=1e-3, rtol=0)
    assert torch.equal(VideoTransform(size=20, resize=40)(clip), out)  # eval: no randomness


def test_transform_train_same_draw_for_every_frame():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, 30, 36, 3), dtype=np.uint8)
    clip = np.repeat(frame, 5, axis=0)
    tf = VideoTransform(size=16, resize=24, train=True, color_jitter=0.4, rotation=10.0, flip_p=0.5)
    out = tf(clip, np.random.default_rng(1))
    for t in range(1, 5):
        assert torch.equal(out[t], out[0])
    assert torch.equal(tf(clip, np.random.default_rng(1)), out)  # same seed, same draw
    assert not torch.equal(tf(clip, np.random.default_rng(2)), out)
    # one pixel map for the whole clip: reversing the frames reverses the output, nothing else
    two = rng.integers(0, 256, (2, 30, 36, 3), dtype=np.uint8)
    a, b = tf(two, np.random.default_rng(5)), tf(two[::-1].copy(), np.random.default_rng(5))
    torch.testing.assert_close(a, b.flip(0), atol=1e-6, rtol=0)


def test_transform_train_augments_values():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    tf = VideoTransform(size=16, resize=24, train=True)
    base = _pixels(tf(clip, augment=ClipAugment(top=3, left=5)))
    torch.testing.assert_close(base, torch.from_numpy(clip[:, 3:19, 5:21]).permute(0, 3, 1, 2).float(),
                               atol=1e-3, rtol=0)  # crop at (top, left), nothing else
    flip = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, flip=True)))
    torch.testing.assert_close(flip, base.flip(-1), atol=1e-3, rtol=0)
    rot = _pixels(tf(clip, augment=ClipAugment(top=4, left=4, angle=90.0)))  # centred square: exact rot90
    ref = torch.from_numpy(clip[:, 4:20, 4:20]).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(rot, torch.rot90(ref, 1, (-2, -1)), atol=1e-2, rtol=0)
    # upsampling 12 -> 24 px: resize, rotation and crop in one resampling of the small frames
    small, up = clip[:, ::2, ::2].copy(), VideoTransform(size=16, resize=24, train=True)
    plain = _pixels(up(small, augment=ClipAugment(top=4, left=4)))  # uint8 resize, then crop
    rot = _pixels(up(small, augment=ClipAugment(top=4, left=4, angle=-90.0)))
    torch.testing.assert_close(rot, torch.rot90(plain, -1, (-2, -1)), atol=1.01, rtol=0)  # uint8 rounding
    rot_flip = _pixels(up(small, augment=ClipAugment(top=4, left=4, angle=-90.0, flip=True)))
    torch.testing.assert_close(rot_flip, rot.flip(-1), atol=1e-3, rtol=0)
    bright = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, brightness=1.5)))
    torch.testing.assert_close(bright, (base * 1.5).clamp(max=255), atol=1e-2, rtol=0)
    sat0 = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, saturation=0.0)))  # grey: channels equal
    torch.testing.assert_close(sat0[:, 0], sat0[:, 1], atol=1e-2, rtol=0)
    con0 = _pixels(tf(clip, augment=ClipAugment(top=3, left=5, contrast=0.0)))  # the clip's mean grey
    grey = (0.299 * base[:, 0] + 0.587 * base[:, 1] + 0.114 * base[:, 2]).mean()
    torch.testing.assert_close(con0, grey.expand_as(con0), atol=1e-2, rtol=0)
    a = tf.sample(np.random.default_rng(0))
    assert 0 <= a.top <= 8 and 0 <= a.left <= 8 and abs(a.angle) <= 5 and 0.8 <= a.brightness <= 1.2


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


# ---------------------------------------------------------------------------- clip dataset

def test_clip_dataset_and_collate(tmp_path):
    write_frames(tmp_path / "a", range(10, 130, 10), size=(8, 8))  # 12 frames, values 10..120
    write_mp4(tmp_path / "b.mp4", colour_clip(3, 8))
    rows = [{"id": "a", "video": str(tmp_path / "a"), "text": "eins"},
            {"id": "b", "video": str(tmp_path / "b.mp4"), "text": "zwei"}]
    ds = ClipDataset(rows, VideoTransform(size=8, resize=8), max_frames=4)
    batch = collate_clips([ds[0], ds[1]])
    assert batch["ids"] == ["a", "b"] and batch["texts"] == ["eins", "zwei"]
    assert batch["index"].tolist() == [0, 1] and batch["lengths"].tolist() == [4, 3]
    assert batch["frames"].shape == (2, 4, 3, 8, 8)
    assert batch["frame_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert batch["frames"][1, 3].abs().sum() == 0  # zero padding
    # eval picks segment centres 1, 4, 7, 10 of the 12 frames: values 20, 50, 80, 110
    assert _pixels(batch["frames"][0])[:, 0, 0, 0].round().tolist() == [20, 50, 80, 110]
    assert np.abs(_pixels(batch["frames"][1, :3])[:, :, 4, 4].numpy() - COLOURS[:3]).max() < 4

    train = ClipDataset(rows, VideoTransform(size=6, resize=8, train=True), max_frames=4, train=True, seed=1)
    first = train[0]["frames"]
    assert torch.equal(train[0]["frames"], first)  # (seed, epoch, index) fixes the draw
    train.set_epoch(1)
    assert not torch.equal(train[0]["frames"], first)
    train.set_epoch(0)
    assert torch.equal(train[0]["frames"], first)  # resumable
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=1, collate_fn=collate_clips)
    assert torch.equal(next(iter(loader))["frames"][0], first)  # the same in a worker process


def test_system_prompt():
    assert system_prompt("German") == ("You are a helpful assistant. Use your expertise to provide the most "
                                       "precise translation. Answer with one single German sentence.")
    assert system_prompt("Chinese", format=False) == ("You are a helpful assistant. Use your expertise to "
                                                       "provide the most precise translation.")
    assert system_prompt("Chinese", task=False, format=False) == "You are a helpful assistant."


# ---------------------------------------------------------------------------- chat examples

ANSWER = "am montag gibt es nebel stark im westen ."
GLOSS = "MONTAG WEST NEBEL STARK"
QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's chat_template without its tools branch
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
LLAMA31_TEMPLATE = (  # Llama-3.1-Instruct's chat_template without its tools branch
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")


def _texts():
    return [system_prompt("German"), system_prompt("Chinese"), ANSWER, GLOSS, "gute nacht ."]


@pytest.fixture(scope="module")
def wordlevel():
    from model import Tokenizer
    return Tokenizer.train(_texts(), kind="wordlevel")


@pytest.fixture(scope="module")
def bpe():
    from model import Tokenizer
    return Tokenizer.train(_texts() * 3, kind="bpe", vocab_size=400)


def _folder_tokenizer(tok, folder, template, **config):
    """tok saved as a Hugging Face folder with another chat template / special tokens."""
    from model import Tokenizer
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(chat_template=template, **config)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").unlink()  # stop ids from eos_token alone
    return Tokenizer.from_pretrained(str(folder))


def _supervised(ex):
    return [t for t in ex["labels"] if t != -100]


def test_chat_example_visual_chatml(wordlevel):
    tok, system = wordlevel, system_prompt("German")
    im_end = tok.token_to_id("<|im_end|>")
    ex = data.build_chat_example(tok, system, 4, answer=ANSWER, visual_slot_id=7)
    ids, vs = ex["input_ids"], ex["visual_start"]
    prefix = tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    suffix = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    assert vs == len(prefix) and ex["n_visual"] == 4
    assert ids == prefix + [7] * 4 + suffix + tok.encode(ANSWER) + [im_end]
    assert tok.decode(ids[:vs], skip_special_tokens=False) == (
        "<|im_start|> system You are a helpful assistant . Use your expertise to provide the most precise "
        "translation . Answer with one single German sentence . <|im_end|> <|im_start|> user")
    assert ex["labels"][: len(ids) - len(tok.encode(ANSWER)) - 1] == [-100] * (len(ids) - len(tok.encode(ANSWER)) - 1)
    assert tok.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + " <|im_end|>"
    assert all(l == t for l, t in zip(ex["labels"], ids) if l != -100)  # labels aligned with input_ids
    prompt = data.build_chat_example(tok, system, 4, visual_slot_id=7)  # generation: the same prompt, nothing supervised
    assert prompt["input_ids"] == ids[: len(prefix) + 4 + len(suffix)] and set(prompt["labels"]) == {-100}
    assert data.build_chat_example(tok, system, 4)["input_ids"][vs:vs + 4] == [tok.pad_token_id] * 4


def test_chat_example_gloss_matches_template(wordlevel):
    tok, system = wordlevel, system_prompt("German")
    ex = data.build_chat_example(tok, system, GLOSS, answer=ANSWER)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": GLOSS},
                {"role": "assistant", "content": ANSWER}]
    assert ex["input_ids"] == tok.apply_chat_template(messages)  # whitespace-split words: no boundary effects
    assert ex["visual_start"] is None and ex["n_visual"] == 0
    assert _supervised(ex) == tok.encode(ANSWER) + [tok.token_to_id("<|im_end|>")]
    with pytest.raises(ValueError, match="empty answer"):
        data.build_chat_example(tok, system, GLOSS, answer="  ")


def test_chat_example_bpe_newline_not_supervised(bpe):
    ex = data.build_chat_example(bpe, system_prompt("German"), 2, answer=ANSWER)
    assert bpe.decode(ex["input_ids"], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n" + ANSWER + "<|im_end|>\n")
    assert ex["labels"][-1] == -100 and ex["labels"][-2] == bpe.token_to_id("<|im_end|>")  # "\n" after the end
    assert bpe.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + "<|im_end|>"


def test_chat_example_qwen25_template_folder(bpe, tmp_path):
    tok = _folder_tokenizer(bpe, tmp_path / "qwen", QWEN25_TEMPLATE)
    ex = data.build_chat_example(tok, None, 3, answer=ANSWER)  # no system turn: Qwen's default one
    vs = ex["visual_start"]
    assert tok.decode(ex["input_ids"][:vs], skip_special_tokens=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n")
    assert ex["input_ids"][vs:vs + 3] == [tok.pad_token_id] * 3
    n_answer = len(_supervised(ex))
    assert tok.decode(ex["input_ids"][vs + 3:-n_answer - 1], skip_special_tokens=False) == (
        "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + "<|im_end|>"
    ex = data.build_chat_example(tok, system_prompt("Chinese"), GLOSS, answer=ANSWER)
    assert tok.decode(ex["input_ids"], skip_special_tokens=False).startswith(
        f"<|im_start|>system\n{system_prompt('Chinese')}<|im_end|>\n<|im_start|>user\n{GLOSS}<|im_end|>")
    # a folder whose stop token is not the turn end: an error, not a model that never stops
    bad = _folder_tokenizer(bpe, tmp_path / "bad", QWEN25_TEMPLATE, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"ends with '<\|im_end\|>\\n', which holds none of the tokenizer's eos ids"):
        data.build_chat_example(bad, None, 3, answer=ANSWER)


def test_chat_example_llama31_template_folder(bpe, tmp_path):
    tok = _folder_tokenizer(bpe, tmp_path / "llama", LLAMA31_TEMPLATE, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>",
                            additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    eot = tok.token_to_id("<|eot_id|>")
    assert tok.eos_token_ids == [eot]
    ex = data.build_chat_example(tok, system_prompt("German"), 5, answer=f"  {ANSWER} ")  # the template trims
    vs = ex["visual_start"]
    assert tok.decode(ex["input_ids"][:vs], skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: 26 Jul 2024\n\n{system_prompt('German')}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert tok.decode(ex["input_ids"][vs + 5:], skip_special_tokens=False) == (
        f"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>")
    assert _supervised(ex)[-1] == eot and ex["labels"][-1] == eot
    assert tok.decode(_supervised(ex), skip_special_tokens=False) == ANSWER + "<|eot_id|>"


def test_collate_vlt_padding(wordlevel):
    tok, system = wordlevel, system_prompt("German")
    a = data.build_chat_example(tok, system, 2, answer=ANSWER)
    b = data.build_chat_example(tok, system, 5, answer="gute nacht .")
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert la > lb
    pad = la - lb
    r = data.collate_vlt([a, b], pad_id=99, padding_side="right")
    assert r["input_ids"][0].tolist() == a["input_ids"] and r["input_ids"][1].tolist() == b["input_ids"] + [99] * pad
    assert r["labels"][1].tolist() == b["labels"] + [-100] * pad
    assert r["attention_mask"].tolist() == [[1] * la, [1] * lb + [0] * pad]
    assert r["visual_start"].tolist() == [a["visual_start"], b["visual_start"]] and r["n_visual"].tolist() == [2, 5]
    assert r["slot_mask"][1].nonzero().flatten().tolist() == list(range(b["visual_start"], b["visual_start"] + 5))
    l = data.collate_vlt([a, b], pad_id=99, padding_side="left")
    assert l["input_ids"][1].tolist() == [99] * pad + b["input_ids"]
    assert l["labels"][1].tolist() == [-100] * pad + b["labels"]
    assert l["attention_mask"][1].tolist() == [0] * pad + [1] * lb
    assert l["visual_start"].tolist() == [a["visual_start"], b["visual_start"] + pad]
    assert (l["input_ids"][l["slot_mask"]] == tok.pad_token_id).all() and int(l["slot_mask"].sum()) == 7
    text = data.collate_vlt([data.build_chat_example(tok, system, GLOSS)], pad_id=0)
    assert text["visual_start"].tolist() == [-1] and not text["slot_mask"].any()


def test_pack_blocks(wordlevel):
    tok = wordlevel
    eos = tok.eos_token_ids[0]
    ids = tok.encode(ANSWER) + [eos] + tok.encode("gute nacht .") + [eos]  # 9 + 1 + 3 + 1 = 14 tokens
    blocks = data.pack_blocks(tok, [ANSWER, "gute nacht ."], block_size=4)
    assert blocks.dtype == torch.long and blocks.tolist() == [ids[0:4], ids[4:8], ids[8:12]]  # tail dropped
    assert tok.decode(blocks[2], skip_special_tokens=False) == ". <|im_end|> gute nacht"  # EOS between texts
    assert data.pack_blocks(tok, [ANSWER], block_size=5, eos_id=0)[1].tolist() == tok.encode("stark im westen .") + [0]
    with pytest.raises(ValueError, match="fewer than one block"):
        data.pack_blocks(tok, ["gute nacht ."], block_size=64)


# ============================================================================ synthetic
# (the synthetic sign language; small datasets, rendered once per module)

import itertools

SMALL = dict(n_train=60, n_dev=10, n_test=20, n_corpus=300, progress=False)
SYNTH_FILES = ("train.jsonl", "dev.jsonl", "test.jsonl", "corpus.jsonl", "meta.json")


def decode_mp4(path):
    """(T, H, W, 3) uint8 through av directly (one thread, one colour converter for the clip)."""
    from av.video.reformatter import VideoReformatter
    rgb = VideoReformatter()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "NONE"
        return np.stack([rgb.reformat(f, format="rgb24").to_ndarray() for f in c.decode(s)])


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def combos(rows):
    return {r["gloss"] for r in rows}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    meta = data.synthesize(out, seed=0, workers=2, **SMALL)
    return out, meta, {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "dev", "test")}


def test_synth_layout_and_rows(synth):
    out, meta, splits = synth
    assert sorted(p.name for p in out.iterdir()) == sorted(SYNTH_FILES + ("videos",))
    assert {s: len(r) for s, r in splits.items()} == {"train": 60, "dev": 10, "test": 20}
    assert meta["seed"] == 0 and meta["language"] == "German" and meta["size"] == 32
    assert json.loads((out / "meta.json").read_text()) == meta
    assert len(meta["glosses"]) == len(data.LEXICON) == 32 and len(meta["minimal_pairs"]) == 15
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(set(ids)) == 90 and len(list((out / "videos").iterdir())) == 90
    names = {s["name"] for s in meta["signers"]}
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"id", "video", "text", "gloss", "signer"}
            assert r["video"] == f"videos/{r['id']}.mp4" and (out / r["video"]).is_file()
            assert r["signer"] in names and 3 <= len(r["gloss"].split()) <= 5
            # the text is the grammar's sentence for the glosses (templates differ in word classes)
            classes = tuple(data.SIGNS[g].word_class for g in r["gloss"].split())
            [t] = [t for t in data.TEMPLATES if t.slots == classes]
            assert r["text"] == data.spoken_sentence(t, r["gloss"].split())
    assert splits["train"][0]["id"] == "train_00000" and splits["test"][19]["id"] == "test_00019"
    # The core reader takes the folder as it is.
    assert [r["id"] for r in load_rows(out, "test")] == [r["id"] for r in splits["test"]]


def test_synth_deterministic_and_seed_dependent(synth, tmp_path):
    out, meta, splits = synth
    again = tmp_path / "again"
    data.synthesize(again, seed=0, workers=1, **SMALL)  # one worker: the pool must not matter
    for name in SYNTH_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    for r in splits["train"][:20] + splits["test"]:
        assert np.array_equal(decode_mp4(again / r["video"]), decode_mp4(out / r["video"])), r["id"]
    other = tmp_path / "other"
    data.synthesize(other, seed=1, workers=1, **SMALL)
    for name in ("train.jsonl", "test.jsonl", "corpus.jsonl"):
        assert (other / name).read_bytes() != (out / name).read_bytes(), name
    for r in splits["test"][:5]:  # other signers, glosses and timing: other frames
        a, b = decode_mp4(other / r["video"]), decode_mp4(out / r["video"])
        assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 5, r["id"]


def test_synth_video_bytes_identical_across_processes_and_order(synth, tmp_path):
    """Every mp4 byte for byte: the pool in this (long) pytest process, one worker in a fresh
    process, and the clips encoded in reverse order. x264's lookahead once made about one clip
    in ten differ after many encodes in one process."""
    import subprocess
    import sys
    from pathlib import Path
    out, _, _ = synth
    fresh = tmp_path / "fresh"
    args = [f"--{k}={v}" for k, v in SMALL.items() if k != "progress"]
    subprocess.run([sys.executable, "data.py", "synth", f"--out={fresh}", "--seed=0", "--workers=1"] + args,
                   check=True, capture_output=True, cwd=Path(data.__file__).parent)
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == sorted(p.name for p in (fresh / "videos").iterdir()) and len(names) == 90
    for name in names:
        assert (fresh / "videos" / name).read_bytes() == (out / "videos" / name).read_bytes(), name
    for name in SYNTH_FILES:
        assert (fresh / name).read_bytes() == (out / name).read_bytes(), name
    plan = data.plan_synthetic(0, SMALL["n_train"], SMALL["n_dev"], SMALL["n_test"], SMALL["n_corpus"])
    clips = [c for rows in plan["splits"].values() for c in rows]
    for c in reversed(clips):  # the last clip first, in this process after all the others
        data._render_job((str(tmp_path / f"{c['id']}.mp4"), c["glosses"], plan["signers"][c["signer"]], 32, 0,
                          c["id"]))
    for c in clips:
        assert (tmp_path / f"{c['id']}.mp4").read_bytes() == (out / "videos" / f"{c['id']}.mp4").read_bytes(), c["id"]


def test_synth_held_out_combinations(synth):
    _, _, splits = synth
    train, dev, test = (combos(splits[s]) for s in ("train", "dev", "test"))
    assert len(dev) == 10 and len(test) == 20  # each held-out clip a combination of its own
    assert not (dev | test) & train and not dev & test
    train_glosses = {g for c in train for g in c.split()}
    assert train_glosses == set(data.SIGNS)  # every gloss is used in training, so every test gloss is
    assert {g for c in test | dev for g in c.split()} <= train_glosses


def test_synth_default_plan_splits():
    plan = data.plan_synthetic(seed=0)  # the demo's 3000/200/300, planned without rendering
    rows = plan["splits"]
    assert [len(rows[s]) for s in ("train", "dev", "test")] == [3000, 200, 300]
    train = {c["glosses"] for c in rows["train"]}
    held = [c["glosses"] for c in rows["dev"] + rows["test"]]
    assert len(set(held)) == 500 and not set(held) & train
    assert {g for c in train for g in c} == set(data.SIGNS)
    for t in data.TEMPLATES:  # no template loses more than 40% of its combinations to dev/test
        n = sum(c["template"] == t.name for c in rows["dev"] + rows["test"])
        assert n <= 0.4 * len(t.combinations()), t.name
    counts = {t.name: sum(c["template"] == t.name for c in rows["train"]) / 3000 for t in data.TEMPLATES}
    assert all(abs(counts[t.name] - t.weight) < 0.04 for t in data.TEMPLATES), counts
    pairs = {tuple(r["gloss"].split()) for r in plan["corpus"] if "gloss" in r}
    assert train <= pairs and not pairs & set(held) and len(pairs) == 2800


def test_synth_minimal_pairs_are_time_reversals():
    signers = data.make_signers(0)
    assert len(data.MINIMAL_PAIRS) == 15
    for a, b in data.MINIMAL_PAIRS:
        assert data.SIGNS[a].word_class == data.SIGNS[b].word_class
        for s in (signers[0], signers[5]):
            fa, fb = data.render_sign(a, s), data.render_sign(b, s)
            assert len(fa) == data.sign_frames(s) and np.array_equal(fa, fb[::-1]), (a, b, s.name)
            assert not np.array_equal(fa, fb)  # only the order differs
            # In a sentence, with the same draws: the sign's frames reversed, everything else equal,
            # so the whole clips are the same multiset of frames (transitions hide the order too).
            ca, sa = data.render_clip(["SONNTAG", a, "TEMPERATUR"], s, np.random.default_rng(7), noise=False)
            cb, sb = data.render_clip(["SONNTAG", b, "TEMPERATUR"], s, np.random.default_rng(7), noise=False)
            assert [x[1:] for x in sa] == [x[1:] for x in sb]
            _, start, stop = sa[1]
            assert np.array_equal(ca[start:stop], cb[start:stop][::-1])
            assert np.array_equal(np.delete(ca, range(start, stop), 0), np.delete(cb, range(start, stop), 0))
            assert sorted(f.tobytes() for f in ca) == sorted(f.tobytes() for f in cb)


def test_synth_signs_are_distinct_sequences():
    s = data.make_signers(0)[2]
    seqs = {g: data.render_sign(g, s).tobytes() for g in data.SIGNS}
    assert len(set(seqs.values())) == len(seqs)  # no two glosses look the same
    partner = {**dict(data.MINIMAL_PAIRS), **{b: a for a, b in data.MINIMAL_PAIRS}}
    for g in data.SIGNS:  # a sign played backwards is its partner, itself (palindrome) or no sign
        back = data.render_sign(g, s)[::-1].tobytes()
        assert [h for h, v in seqs.items() if v == back] == [partner.get(g, g)], g


def test_synth_signers_differ():
    signers = data.make_signers(0)
    assert len({s.name for s in signers}) == 8 and len({s.hand for s in signers}) == 8
    for s in signers:
        assert 0.8 <= s.speed <= 1.2 and 0.9 <= s.scale <= 1.1 and abs(s.dx) <= 2 and abs(s.dy) <= 2
        assert data.sign_frames(s) == round(10 / s.speed) and 8 <= data.sign_frames(s) <= 12
    assert len({data.sign_frames(s) for s in signers}) >= 3
    a, b = data.render_sign("REGEN", signers[0]), data.render_sign("REGEN", signers[1])
    assert (a[0, 0, 0] == signers[0].background).all() and (b[0, 0, 0] == signers[1].background).all()
    # the hand is large and in the signer's tint: ~7 px wide and high contrast against the background
    hand = (a[0] == signers[0].hand).all(-1)
    assert 20 <= hand.sum() <= 64
    assert np.abs(np.array(signers[0].hand) - np.array(signers[0].background)).sum() > 300
    # noise: per signer, zero-mean, and not in the clean render
    rng = np.random.default_rng(0)
    noisy, _ = data.render_clip(["REGEN"], signers[0], rng, noise=True)
    clean, _ = data.render_clip(["REGEN"], signers[0], np.random.default_rng(0), noise=False)
    d = noisy.astype(float) - clean
    assert abs(d.mean()) < 0.3 and abs(d.std() - signers[0].noise) < 0.5


def test_synth_text_is_not_transcription(synth):
    _, _, splits = synth
    by = {t.name: t for t in data.TEMPLATES}
    assert data.spoken_sentence(by["forecast"], ("MONTAG", "WEST", "NEBEL", "STARK")) == \
        "am montag gibt es im westen dichten nebel ."
    assert data.spoken_sentence(by["weather"], ("NORD", "HEUTE", "REGEN")) == "heute regnet es im norden ."
    assert data.spoken_sentence(by["trend"], ("MORGEN", "SUED", "TEMPERATUR", "SINKEN", "STARK")) == \
        "morgen sinken die temperaturen im süden deutlich ."
    assert data.spoken_sentence(by["temperature"], ("FREITAG", "NACHT", "KALT", "OST")) == \
        "am freitag wird es in der nacht im osten kalt ."
    gloss_words = {g.lower() for g in data.SIGNS}
    for r in splits["train"] + splits["dev"] + splits["test"]:
        assert r["text"].endswith(" .") and r["text"] == r["text"].lower()
        assert set(r["text"].split()) - gloss_words - {"."}, r  # unsigned words
    # the order differs: a gloss's spoken words come in another order than the glosses
    glosses = "NORD HEUTE REGEN".split()
    text = data.spoken_sentence(by["weather"], glosses)
    pos = [text.index(data.SPOKEN.get(g, data.WEATHER_VERB.get(g, ""))) for g in glosses]
    assert pos != sorted(pos)


def test_synth_mp4_frames(synth):
    out, meta, splits = synth
    plan = data.plan_synthetic(0, n_train=60, n_dev=10, n_test=20, n_corpus=300)
    n_frames = []
    for split, rows in splits.items():
        for r, c in zip(rows, plan["splits"][split]):
            assert r["id"] == c["id"] and r["gloss"] == " ".join(c["glosses"])
            video = decode_mp4(out / r["video"])
            n_frames.append(len(video))
            if split != "test":
                continue
            signer = plan["signers"][c["signer"]]
            want, segments = data.render_clip(c["glosses"], signer, data._clip_rng(0, c["id"]))
            assert video.shape == want.shape == (len(want), 32, 32, 3)
            assert len(segments) == len(c["glosses"]) and 3 + 3 * (8 + 3) <= len(want) <= 4 + 5 * (12 + 4)
            # yuv444p at crf 10: the shapes survive; errors are small and rare
            err = np.abs(video.astype(int) - want)
            assert err.mean() < 3 and (err > 40).mean() < 0.01, r["id"]
    assert meta["timing"]["mean_frames_per_clip"] == round(float(np.mean(n_frames)), 3)
    assert meta["timing"]["total_frames"] == sum(n_frames)


def test_synth_corpus(synth):
    out, meta, splits = synth
    corpus = read_jsonl(out / "corpus.jsonl")
    assert len(corpus) == 300 and all(set(r) in ({"gloss", "text"}, {"text"}) for r in corpus)
    pairs = [r for r in corpus if "gloss" in r]
    assert len(pairs) == 210 == meta["counts"]["corpus_pairs"]
    held = combos(splits["dev"]) | combos(splits["test"])
    held_text = {r["text"] for r in splits["dev"] + splits["test"]}
    assert not {r["gloss"] for r in pairs} & held  # no dev/test combination, as pair or sentence
    assert not {r["text"] for r in corpus} & held_text
    assert combos(splits["train"]) <= {r["gloss"] for r in pairs}  # every training combination
    assert len({r["gloss"] for r in pairs} - combos(splits["train"])) >= 100  # plus novel ones
    train_text = {r["gloss"]: r["text"] for r in splits["train"]}
    assert all(train_text[r["gloss"]] == r["text"] for r in pairs if r["gloss"] in train_text)
    # the corpus is read by the core reader as it is
    assert read_corpus(out / "corpus.jsonl")[:3] == corpus[:3]


def test_synth_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = itertools.count()
    real = data._write_mp4

    def flaky(path, frames, **kw):
        if next(calls) == 3:
            raise RuntimeError("disk full")
        real(path, frames, **kw)

    monkeypatch.setattr(data, "_write_mp4", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        data.synthesize(tmp_path / "out", seed=0, workers=1, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one


def test_synth_refuses_non_empty_out_and_cli(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        data.synthesize(out, progress=False)
    tiny = ["--n_train", "20", "--n_dev", "2", "--n_test", "2", "--n_corpus", "20", "--workers", "1"]
    assert data.main(["synth", "--out", str(out), *tiny]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--overwrite=true" in err and (out / "keep.txt").exists()
    # --overwrite replaces a synthetic dataset, never a user's folder
    assert data.main(["synth", f"--out={out}", "--seed=3", "--overwrite=true", *tiny]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("not a synthetic dataset written by data.py synth (it holds keep.txt); --overwrite replaces "
                        "only those: choose another --out") and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert data.main(["synth", f"--out={out}", "--seed=2", *tiny]) == 0
    assert data.main(["synth", f"--out={out}", "--seed=3", "--overwrite=true", *tiny]) == 0
    assert len(read_jsonl(out / "train.jsonl")) == 20
    assert json.loads((out / "meta.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="n_train=5"):
        data.plan_synthetic(0, n_train=5)
    with pytest.raises(ValueError, match="held-out"):
        data.plan_synthetic(0, n_dev=2000, n_test=2000)
