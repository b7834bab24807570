"""Tests for demo.py's runner: stages side by side, each its own process with the threads it is
given, their seconds; a failing stage stops the demo with its log's tail. (The recipe itself runs
in tests/test_ablations.py's quick setting; the full demo is `make demo`.)"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402

STAGE = ("import json, os, sys, time; t = time.time(); time.sleep(0.5); "
         "json.dump({'start': t, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS']}, open(sys.argv[1], 'w'))")


def test_stages_run_side_by_side_with_their_threads(tmp_path):
    stages = {k: (f"stage {k}", ["-c", STAGE, str(tmp_path / f"{k}.json")]) for k in ("a", "b")}
    seconds = demo.run(stages, str(tmp_path), threads=1)
    assert set(seconds) == {"a", "b"} and all(s >= 0.5 for s in seconds.values())
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("a", "b"))
    assert a["threads"] == b["threads"] == "1"
    assert a["start"] < b["end"] and b["start"] < a["end"]          # the two ran at the same time
    assert (tmp_path / "stage_a.log").exists() and (tmp_path / "stage_b.log").exists()
    demo.run({"c": ("stage c", ["-c", STAGE, str(tmp_path / "c.json")])}, str(tmp_path), threads=2)
    assert json.loads((tmp_path / "c.json").read_text())["threads"] == "2"


def test_a_failing_stage_stops_the_demo_with_its_log(tmp_path, capsys):
    stages = {"ok": ("fine", ["-c", "pass"]), "bad": ("broken", ["-c", "print('the cause'); raise SystemExit(3)"])}
    with pytest.raises(SystemExit, match=r"demo: broken failed \(exit 3\); full log in .*broken.log"):
        demo.run(stages, str(tmp_path), threads=1)
    assert "the cause" in capsys.readouterr().out
