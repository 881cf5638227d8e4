"""`sam-backend bench encoder` end to end on the real architectures (random weights), briefly: its
speed-up figure is the median of alternating vit_b / model encode pairs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_bench_encoder_pairs_each_encode_with_one_of_vit_b_and_prints_a_json_last_line():
    result = subprocess.run(
        [sys.executable, "-m", "backend.commands.cli", "bench", "encoder", "--models", "vit_b,l0", "--repeat", "2",
         "--warm", "0", "--threads", "1", "--device", "cpu"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    rows = {r["model_type"]: r for r in figures["models"]}
    assert list(rows) == ["vit_b", "l0"]  # in the order asked
    vit_b, l0 = rows["vit_b"], rows["l0"]
    assert len(vit_b["encode_runs"]) == 2 and len(l0["encode_runs"]) == 2  # vit_b encoded once per l0 encode
    # each pair: vit_b's encode just before l0's; the figure is the median of their ratios
    pairs = [a / b for a, b in zip(vit_b["encode_runs"], l0["encode_runs"])]
    assert l0["speedup_runs"] == pytest.approx(pairs, abs=0.01)
    assert l0["speedup_vs_vit_b"] == pytest.approx(statistics.median(pairs), abs=0.06)
    assert vit_b["speedup_vs_vit_b"] == 1.0 and vit_b["family"] == "sam" and l0["family"] == "efficientvit_sam"
    assert l0["embedding_bytes"] > 0 and vit_b["peak_rss_mb"] > l0["peak_rss_mb"]  # each in its own process
    assert "alternating pairs" in result.stdout and figures["fastest"] in rows
