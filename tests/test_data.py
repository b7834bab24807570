"""Tests for data.py: video io, transforms, readers, collate, prompts, corpus."""

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
    from tokenizer import Tokenizer
    return Tokenizer.train(_texts(), kind="wordlevel")


@pytest.fixture(scope="module")
def bpe():
    from tokenizer import Tokenizer
    return Tokenizer.train(_texts() * 3, kind="bpe", vocab_size=400)


def _folder_tokenizer(tok, folder, template, **config):
    """tok saved as a Hugging Face folder with another chat template / special tokens."""
    from tokenizer import Tokenizer
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
