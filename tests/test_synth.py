"""Tests for synth.py: the synthetic sign language (small datasets, rendered once per module)."""

import itertools
import json

import av
import numpy as np
import pytest

import synth
from readers import load_rows, read_corpus, read_video

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
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    meta = synth.synthesize(out, seed=0, workers=2, **SMALL)
    return out, meta, {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "dev", "test")}


def test_synth_layout_and_rows(synthetic):
    out, meta, splits = synthetic
    assert sorted(p.name for p in out.iterdir()) == sorted(SYNTH_FILES + ("videos",))
    assert {s: len(r) for s, r in splits.items()} == {"train": 60, "dev": 10, "test": 20}
    assert meta["seed"] == 0 and meta["language"] == "German" and meta["size"] == 32
    assert json.loads((out / "meta.json").read_text()) == meta
    assert len(meta["glosses"]) == len(synth.LEXICON) == 32 and len(meta["minimal_pairs"]) == 15
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(set(ids)) == 90 and len(list((out / "videos").iterdir())) == 90
    names = {s["name"] for s in meta["signers"]}
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"id", "video", "text", "gloss", "signer"}
            assert r["video"] == f"videos/{r['id']}.mp4" and (out / r["video"]).is_file()
            assert r["signer"] in names and 3 <= len(r["gloss"].split()) <= 5
            # the text is the grammar's sentence for the glosses (templates differ in word classes)
            classes = tuple(synth.SIGNS[g].word_class for g in r["gloss"].split())
            [t] = [t for t in synth.TEMPLATES if t.slots == classes]
            assert r["text"] == synth.spoken_sentence(t, r["gloss"].split())
    assert splits["train"][0]["id"] == "train_00000" and splits["test"][19]["id"] == "test_00019"
    # The core reader takes the folder as it is.
    assert [r["id"] for r in load_rows(out, "test")] == [r["id"] for r in splits["test"]]


def test_synth_deterministic_and_seed_dependent(synthetic, tmp_path):
    out, meta, splits = synthetic
    again = tmp_path / "again"
    synth.synthesize(again, seed=0, workers=1, **SMALL)  # one worker: the pool must not matter
    for name in SYNTH_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    for r in splits["train"][:20] + splits["test"]:
        assert np.array_equal(decode_mp4(again / r["video"]), decode_mp4(out / r["video"])), r["id"]
    other = tmp_path / "other"
    synth.synthesize(other, seed=1, workers=1, **SMALL)
    for name in ("train.jsonl", "test.jsonl", "corpus.jsonl"):
        assert (other / name).read_bytes() != (out / name).read_bytes(), name
    for r in splits["test"][:5]:  # other signers, glosses and timing: other frames
        a, b = decode_mp4(other / r["video"]), decode_mp4(out / r["video"])
        assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 5, r["id"]


def test_synth_video_bytes_identical_across_processes_and_order(synthetic, tmp_path):
    """Every mp4 byte for byte: the pool in this (long) pytest process, one worker in a fresh
    process, and the clips encoded in reverse order. x264's lookahead once made about one clip
    in ten differ after many encodes in one process."""
    import subprocess
    import sys
    from pathlib import Path
    out, _, _ = synthetic
    fresh = tmp_path / "fresh"
    args = [f"--{k}={v}" for k, v in SMALL.items() if k != "progress"]
    subprocess.run([sys.executable, "synth.py", f"--out={fresh}", "--seed=0", "--workers=1"] + args,
                   check=True, capture_output=True, cwd=Path(synth.__file__).parent)
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == sorted(p.name for p in (fresh / "videos").iterdir()) and len(names) == 90
    for name in names:
        assert (fresh / "videos" / name).read_bytes() == (out / "videos" / name).read_bytes(), name
    for name in SYNTH_FILES:
        assert (fresh / name).read_bytes() == (out / name).read_bytes(), name
    plan = synth.plan_synthetic(0, SMALL["n_train"], SMALL["n_dev"], SMALL["n_test"], SMALL["n_corpus"])
    clips = [c for rows in plan["splits"].values() for c in rows]
    for c in reversed(clips):  # the last clip first, in this process after all the others
        synth._render_job((str(tmp_path / f"{c['id']}.mp4"), c["glosses"], plan["signers"][c["signer"]], 32, 0,
                          c["id"]))
    for c in clips:
        assert (tmp_path / f"{c['id']}.mp4").read_bytes() == (out / "videos" / f"{c['id']}.mp4").read_bytes(), c["id"]


def test_synth_held_out_combinations(synthetic):
    _, _, splits = synthetic
    train, dev, test = (combos(splits[s]) for s in ("train", "dev", "test"))
    assert len(dev) == 10 and len(test) == 20  # each held-out clip a combination of its own
    assert not (dev | test) & train and not dev & test
    train_glosses = {g for c in train for g in c.split()}
    assert train_glosses == set(synth.SIGNS)  # every gloss is used in training, so every test gloss is
    assert {g for c in test | dev for g in c.split()} <= train_glosses


def test_synth_default_plan_splits():
    plan = synth.plan_synthetic(seed=0)  # the demo's 3000/200/300, planned without rendering
    rows = plan["splits"]
    assert [len(rows[s]) for s in ("train", "dev", "test")] == [3000, 200, 300]
    train = {c["glosses"] for c in rows["train"]}
    held = [c["glosses"] for c in rows["dev"] + rows["test"]]
    assert len(set(held)) == 500 and not set(held) & train
    assert {g for c in train for g in c} == set(synth.SIGNS)
    for t in synth.TEMPLATES:  # no template loses more than 40% of its combinations to dev/test
        n = sum(c["template"] == t.name for c in rows["dev"] + rows["test"])
        assert n <= 0.4 * len(t.combinations()), t.name
    counts = {t.name: sum(c["template"] == t.name for c in rows["train"]) / 3000 for t in synth.TEMPLATES}
    assert all(abs(counts[t.name] - t.weight) < 0.04 for t in synth.TEMPLATES), counts
    pairs = {tuple(r["gloss"].split()) for r in plan["corpus"] if "gloss" in r}
    assert train <= pairs and not pairs & set(held) and len(pairs) == 2800


def test_synth_minimal_pairs_are_time_reversals():
    signers = synth.make_signers(0)
    assert len(synth.MINIMAL_PAIRS) == 15
    for a, b in synth.MINIMAL_PAIRS:
        assert synth.SIGNS[a].word_class == synth.SIGNS[b].word_class
        for s in (signers[0], signers[5]):
            fa, fb = synth.render_sign(a, s), synth.render_sign(b, s)
            assert len(fa) == synth.sign_frames(s) and np.array_equal(fa, fb[::-1]), (a, b, s.name)
            assert not np.array_equal(fa, fb)  # only the order differs
            # In a sentence, with the same draws: the sign's frames reversed, everything else equal,
            # so the whole clips are the same multiset of frames (transitions hide the order too).
            ca, sa = synth.render_clip(["SONNTAG", a, "TEMPERATUR"], s, np.random.default_rng(7), noise=False)
            cb, sb = synth.render_clip(["SONNTAG", b, "TEMPERATUR"], s, np.random.default_rng(7), noise=False)
            assert [x[1:] for x in sa] == [x[1:] for x in sb]
            _, start, stop = sa[1]
            assert np.array_equal(ca[start:stop], cb[start:stop][::-1])
            assert np.array_equal(np.delete(ca, range(start, stop), 0), np.delete(cb, range(start, stop), 0))
            assert sorted(f.tobytes() for f in ca) == sorted(f.tobytes() for f in cb)


def test_synth_signs_are_distinct_sequences():
    s = synth.make_signers(0)[2]
    seqs = {g: synth.render_sign(g, s).tobytes() for g in synth.SIGNS}
    assert len(set(seqs.values())) == len(seqs)  # no two glosses look the same
    partner = {**dict(synth.MINIMAL_PAIRS), **{b: a for a, b in synth.MINIMAL_PAIRS}}
    for g in synth.SIGNS:  # a sign played backwards is its partner, itself (palindrome) or no sign
        back = synth.render_sign(g, s)[::-1].tobytes()
        assert [h for h, v in seqs.items() if v == back] == [partner.get(g, g)], g


def test_synth_signers_differ():
    signers = synth.make_signers(0)
    assert len({s.name for s in signers}) == 8 and len({s.hand for s in signers}) == 8
    for s in signers:
        assert 0.8 <= s.speed <= 1.2 and 0.9 <= s.scale <= 1.1 and abs(s.dx) <= 2 and abs(s.dy) <= 2
        assert synth.sign_frames(s) == round(10 / s.speed) and 8 <= synth.sign_frames(s) <= 12
    assert len({synth.sign_frames(s) for s in signers}) >= 3
    a, b = synth.render_sign("REGEN", signers[0]), synth.render_sign("REGEN", signers[1])
    assert (a[0, 0, 0] == signers[0].background).all() and (b[0, 0, 0] == signers[1].background).all()
    # the hand is large and in the signer's tint: ~7 px wide and high contrast against the background
    hand = (a[0] == signers[0].hand).all(-1)
    assert 20 <= hand.sum() <= 64
    assert np.abs(np.array(signers[0].hand) - np.array(signers[0].background)).sum() > 300
    # noise: per signer, zero-mean, and not in the clean render
    rng = np.random.default_rng(0)
    noisy, _ = synth.render_clip(["REGEN"], signers[0], rng, noise=True)
    clean, _ = synth.render_clip(["REGEN"], signers[0], np.random.default_rng(0), noise=False)
    d = noisy.astype(float) - clean
    assert abs(d.mean()) < 0.3 and abs(d.std() - signers[0].noise) < 0.5


def test_synth_text_is_not_transcription(synthetic):
    _, _, splits = synthetic
    by = {t.name: t for t in synth.TEMPLATES}
    assert synth.spoken_sentence(by["forecast"], ("MONTAG", "WEST", "NEBEL", "STARK")) == \
        "am montag gibt es im westen dichten nebel ."
    assert synth.spoken_sentence(by["weather"], ("NORD", "HEUTE", "REGEN")) == "heute regnet es im norden ."
    assert synth.spoken_sentence(by["trend"], ("MORGEN", "SUED", "TEMPERATUR", "SINKEN", "STARK")) == \
        "morgen sinken die temperaturen im süden deutlich ."
    assert synth.spoken_sentence(by["temperature"], ("FREITAG", "NACHT", "KALT", "OST")) == \
        "am freitag wird es in der nacht im osten kalt ."
    gloss_words = {g.lower() for g in synth.SIGNS}
    for r in splits["train"] + splits["dev"] + splits["test"]:
        assert r["text"].endswith(" .") and r["text"] == r["text"].lower()
        assert set(r["text"].split()) - gloss_words - {"."}, r  # unsigned words
    # the order differs: a gloss's spoken words come in another order than the glosses
    glosses = "NORD HEUTE REGEN".split()
    text = synth.spoken_sentence(by["weather"], glosses)
    pos = [text.index(synth.SPOKEN.get(g, synth.WEATHER_VERB.get(g, ""))) for g in glosses]
    assert pos != sorted(pos)


def test_synth_mp4_frames(synthetic):
    out, meta, splits = synthetic
    plan = synth.plan_synthetic(0, n_train=60, n_dev=10, n_test=20, n_corpus=300)
    n_frames = []
    for split, rows in splits.items():
        for r, c in zip(rows, plan["splits"][split]):
            assert r["id"] == c["id"] and r["gloss"] == " ".join(c["glosses"])
            video = decode_mp4(out / r["video"])
            n_frames.append(len(video))
            if split != "test":
                continue
            signer = plan["signers"][c["signer"]]
            want, segments = synth.render_clip(c["glosses"], signer, synth._clip_rng(0, c["id"]))
            assert video.shape == want.shape == (len(want), 32, 32, 3)
            assert len(segments) == len(c["glosses"]) and 3 + 3 * (8 + 3) <= len(want) <= 4 + 5 * (12 + 4)
            # yuv444p at crf 10: the shapes survive; errors are small and rare
            err = np.abs(video.astype(int) - want)
            assert err.mean() < 3 and (err > 40).mean() < 0.01, r["id"]
    assert meta["timing"]["mean_frames_per_clip"] == round(float(np.mean(n_frames)), 3)
    assert meta["timing"]["total_frames"] == sum(n_frames)


def test_synth_npy_clips_are_the_rendered_frames(tmp_path):
    """--video_format=npy (the demo's): the same plan, each clip the rendered frames exactly, read by read_video."""
    small = dict(SMALL, n_train=40, n_dev=2, n_test=4)
    meta = synth.synthesize(tmp_path / "npy", seed=0, workers=1, video_format="npy", **small)
    plan = synth.plan_synthetic(0, **{k: v for k, v in small.items() if k != "progress"})
    rows = load_rows(tmp_path / "npy", "test")
    assert meta["video"]["format"] == "npy" and len(rows) == 4
    for r, c in zip(rows, plan["splits"]["test"]):
        assert r["video"].endswith(f"videos/{c['id']}.npy")
        want, _ = synth.render_clip(c["glosses"], plan["signers"][c["signer"]], synth._clip_rng(0, c["id"]))
        assert np.array_equal(read_video(r["video"]), want), r["id"]


def test_synth_corpus(synthetic):
    out, meta, splits = synthetic
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
    real = synth._write_mp4

    def flaky(path, frames, **kw):
        if next(calls) == 3:
            raise RuntimeError("disk full")
        real(path, frames, **kw)

    monkeypatch.setattr(synth, "_write_mp4", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.synthesize(tmp_path / "out", seed=0, workers=1, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one


def test_synth_refuses_non_empty_out_and_cli(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        synth.synthesize(out, progress=False)
    tiny = ["--n_train", "20", "--n_dev", "2", "--n_test", "2", "--n_corpus", "20", "--workers", "1"]
    assert synth.main(["--out", str(out), *tiny]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--overwrite=true" in err and (out / "keep.txt").exists()
    # --overwrite replaces a synthetic dataset, never a user's folder
    assert synth.main([f"--out={out}", "--seed=3", "--overwrite=true", *tiny]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("not a synthetic dataset written by synth.py (it holds keep.txt); --overwrite replaces "
                        "only those: choose another --out") and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert synth.main([f"--out={out}", "--seed=2", *tiny]) == 0
    assert synth.main([f"--out={out}", "--seed=3", "--overwrite=true", *tiny]) == 0
    assert len(read_jsonl(out / "train.jsonl")) == 20
    assert json.loads((out / "meta.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="n_train=5"):
        synth.plan_synthetic(0, n_train=5)
    with pytest.raises(ValueError, match="held-out"):
        synth.plan_synthetic(0, n_dev=2000, n_test=2000)
