"""Tests for plot.py: the curves and example-clip pictures (fake runs, a tiny synthetic dataset)."""

import json

import numpy as np
import pytest
from PIL import Image

import plot
import synth
from cli import cli
from errors import DataError, MissingFileError, UserError
from readers import load_rows, read_video


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_run(folder, losses, lrs, dev_every, dev):
    """metrics.jsonl as training.fit writes it: a row per logged step, a dev row every few."""
    rows = []
    for i, (loss, lr) in enumerate(zip(losses, lrs)):
        step = 10 * (i + 1)
        rows.append({"step": step, "epoch": 0, "loss": loss, "lr": lr, "grad_norm": 1.0, "skipped": 0,
                     "clips_per_s": 100.0, "elapsed_s": step / 10})
        if step % dev_every == 0:
            rows.append({"step": step, "epoch": 0, **{k: v[step // dev_every - 1] for k, v in dev.items()},
                         "best_step": step})
    write_jsonl(folder / "metrics.jsonl", rows)
    return folder


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def fig_pixels(fig):
    w, h = fig.get_size_inches() * plot.DPI
    return round(w), round(h)


def lines_of(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


# ---------------------------------------------------------------------------- curves

def test_curves_one_panel_per_quantity_one_line_per_run(tmp_path):
    vcp = fake_run(tmp_path / "vcp", [4.0, 3.0, 2.5, 2.0], [1e-3, 2e-3, 1e-3, 1e-5], 20,
                   {"dev_loss": [3.5, 2.9], "dev_r1": [10.0, 30.0]})
    vlt = fake_run(tmp_path / "vlt", [6.0, 5.0, 4.0], [3e-4, 1e-4, 1e-6], 30,
                   {"dev_bleu4": [12.5], "dev_rouge": [40.0]})
    out = tmp_path / "curves.png"
    fig = plot.curves([vcp, vlt], out, labels=["VCP", "VLT"])
    assert png_size(out) == fig_pixels(fig) == (3 * 420, 2 * 320)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == [plot.TITLES[q] for q in ("loss", "lr", "dev_loss", "dev_r1", "dev_bleu4", "dev_rouge")]
    # the plotted values are the ones written, each run its own line
    assert lines_of(axes[plot.TITLES["loss"]]) == {"VCP": ([10, 20, 30, 40], [4.0, 3.0, 2.5, 2.0]),
                                               "VLT": ([10, 20, 30], [6.0, 5.0, 4.0])}
    assert lines_of(axes["learning rate"])["VLT"] == ([10, 20, 30], [3e-4, 1e-4, 1e-6])
    assert axes["learning rate"].get_yscale() == "log"
    assert lines_of(axes[plot.TITLES["dev_r1"]]) == {"VCP": ([20, 40], [10.0, 30.0])}
    assert lines_of(axes[plot.TITLES["dev_bleu4"]]) == {"VLT": ([30], [12.5])}
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines_of(ax))


def test_curves_default_labels_and_command_line(tmp_path, capsys):
    runs = [fake_run(tmp_path / name, [2.0, 1.0], [1e-3, 1e-4], 1000, {}) for name in ("cpt", "vlt_full")]
    out = tmp_path / "c.png"
    plot.main(["--runs", str(runs[0]), str(runs[1]), "--out", str(out)])
    assert capsys.readouterr().out.strip() == f"curves: {out}"
    assert png_size(out) == (2 * 420, 320)          # loss and lr only: no dev rows
    fig = plot.curves(runs, out)
    assert [list(lines_of(ax)) for ax in fig.axes] == [["cpt", "vlt_full"]] * 2


def test_curves_missing_or_empty_metrics_is_one_line(tmp_path, capsys):
    good = fake_run(tmp_path / "good", [1.0], [1e-3], 1000, {})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    for folder, kind in (("nothing", MissingFileError), ("empty", DataError)):
        with pytest.raises(kind) as e:
            plot.curves([good, tmp_path / folder], tmp_path / "x.png")
        assert isinstance(e.value, UserError)
        assert str(tmp_path / folder / "metrics.jsonl") in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as e:       # the command prints it as one line, no traceback
        cli(plot.main, ["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nothing/metrics.jsonl" in err


# ---------------------------------------------------------------------------- examples

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The fewest clips synth.py allows: 13 train (every gloss once) and 6 test."""
    out = tmp_path_factory.mktemp("plot") / "data"
    meta = synth.synthesize(out, seed=0, n_train=13, n_dev=0, n_test=6, n_corpus=0, workers=1, progress=False)
    return out, meta


def test_examples_strips_texts_and_the_reversed_gloss(tiny_data, tmp_path):
    data, meta = tiny_data
    rows = load_rows(data, "test")
    preds = {label: write_jsonl(tmp_path / f"{name}.jsonl",
                                [{"id": r["id"], "hypothesis": f"{name} says {r['id']}", "reference": r["text"]}
                                 for r in reversed(rows)])  # any order: matched by id
             for label, name in (("trained", "full"), ("text-only", "text"))}
    out = tmp_path / "examples.png"
    fig = plot.examples(data, preds, out, n=2, every=4)
    assert png_size(out) == fig_pixels(fig)
    texts = [t.get_text() for t in fig.texts]
    reverse_of = {g["gloss"]: g["reverse_of"] for g in meta["glosses"] if g["reverse_of"]}
    for r in rows[:2]:
        assert f"reference: {r['text']}" in texts
        assert f"trained: full says {r['id']}" in texts and f"text-only: text says {r['id']}" in texts
    assert not any(rows[2]["id"] in t for t in texts)
    # the first test clip holds a reversed gloss: it is marked and its pair named
    [reversed_gloss] = [g for g in rows[0]["gloss"].split() if g in reverse_of]
    assert f"played backwards: {reversed_gloss}* = {reverse_of[reversed_gloss]}" in texts
    # each strip is every 4th decoded frame, side by side
    assert len(fig.axes) == 2
    frames = read_video(rows[0]["video"])
    strip = fig.axes[0].get_images()[0].get_array()
    assert np.array_equal(strip, plot._strip(frames[::4]))
    assert strip.shape[:2] == (32, len(frames[::4]) * 34 - 2)


def test_pick_clips_takes_a_minimal_pair_clip():
    rows = [{"id": str(i), "gloss": g} for i, g in enumerate(["A B", "B C", "C D", "A SUED", "NORD"])]
    reverse_of = {"SUED": "NORD"}
    assert [r["id"] for r in plot.pick_clips(rows, reverse_of, 2)] == ["0", "3"]
    assert [r["id"] for r in plot.pick_clips(rows, reverse_of, 4)] == ["0", "1", "2", "3"]
    assert [r["id"] for r in plot.pick_clips(rows, {}, 2)] == ["0", "1"]  # real data: no meta.json


def test_examples_missing_prediction_names_the_file(tiny_data, tmp_path):
    data, _ = tiny_data
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "nope", "hypothesis": "x", "reference": "y"}])
    with pytest.raises(DataError, match=f"{path}: no prediction for clip test_00000"):
        plot.examples(data, {"trained": path}, tmp_path / "e.png")
    with pytest.raises(MissingFileError, match="predictions not found"):
        plot.examples(data, {"trained": tmp_path / "absent.jsonl"}, tmp_path / "e.png")
