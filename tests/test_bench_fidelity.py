"""`sam-backend bench fidelity` runs end to end with tiny settings: one small screen, the small
random SAM behind a real `serve`, and prints its table and a JSON last line with every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from backend.bench.screens import KINDS

ROOT = Path(__file__).resolve().parents[1]


def test_bench_fidelity_prints_the_table_and_a_json_line(tiny_checkpoint, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "backend.commands.cli", "bench", "fidelity", "--checkpoint", str(tiny_checkpoint),
         "--screens", "1", "--width", "2400", "--height", "1600", "--cold", "1", "--warm", "2", "--device", "cpu",
         "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    out = run.stdout
    assert "CEILING figures" in out and "stand-in decoder" in out
    assert "whole IoU" in out and "zoom IoU" in out and "cold (1 window encode)" in out
    figures = json.loads(out.strip().splitlines()[-1])
    for path in ("whole", "zoom"):
        for kind in KINDS:
            entry = figures[path][kind]
            assert 0.0 <= entry["iou"] <= 1.0 and 0.0 <= entry["boundary_iou"] <= 1.0
    # the zoom path's ceiling beats the whole image where the whole image cannot see
    for kind in ("scratch", "crack"):
        assert figures["whole"][kind]["iou"] < 0.5 < figures["zoom"][kind]["iou"]
    assert figures["zoom"]["large"]["boundary_iou"] > figures["whole"]["large"]["boundary_iou"]
    timing = figures["timing"]
    assert timing["cold_zoom_ms"]["n"] == 1 and timing["warm_zoom_brush_ms"]["n"] == 2
    assert timing["warm_zoom_polygon_ms"]["p50"] > 0
    assert run.returncode == (0 if all(t["met"] for t in figures["targets"].values()) else 1), run.stderr[-2000:]
