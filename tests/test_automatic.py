"""Segment everything's coarse-to-fine search loses no object the full grid finds, and sends fewer
prompts. Which objects a search finds is checked with a STAND-IN decoder behind the model's
`decode` interface (backend.bench.everything.SceneDecoder: a click answers the segment under it)
on synthetic scenes whose objects are known; random SAM weights accept no mask at SAM's
thresholds. The real (tiny, random) SAM runs both decoder paths for the bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from backend.bench.everything import TABLE, SceneDecoder, iou, make_scene
from backend.settings import PRELABEL_SEARCHES, Settings, SettingsError
from model.automatic import SEARCHES, AutomaticConfig, grid_points, search, search_everything, search_passes
from model.sam import SamModel

MIN_AREA = 0.0005  # PRELABEL_MIN_AREA's default, 0.05 %


def config(search_kind: str, **changes) -> AutomaticConfig:
    return AutomaticConfig(points_per_side=16, min_area_fraction=MIN_AREA, search=search_kind, **changes)


def test_coarse_passes_partition_the_grid_from_a_four_by_four_start():
    for n in (2, 5, 8, 10, 16, 32):
        passes = search_passes(n, "coarse")
        assert sorted(np.concatenate(passes).tolist()) == list(range(n * n))  # every point once
    assert [len(p) for p in search_passes(16, "coarse")] == [16, 48, 192]
    assert [len(p) for p in search_passes(32, "coarse")] == [16, 48, 192, 768]
    first = grid_points(16, (768, 1024))[search_passes(16, "coarse")[0]]
    assert len(np.unique(first[:, 0])) == 4 and len(np.unique(first[:, 1])) == 4  # a 4 x 4 lattice
    assert [len(p) for p in search_passes(16, "grid")] == [256]
    assert SEARCHES == PRELABEL_SEARCHES


@pytest.mark.parametrize("seed", range(6))
def test_coarse_search_finds_every_object_the_full_grid_finds_with_far_fewer_prompts(seed):
    scene = make_scene(seed)
    found = {}
    for kind in ("grid", "coarse"):
        decoder = SceneDecoder()
        result = search_everything(decoder, scene.labels, scene.input_size, config(kind))
        assert result.prompts == decoder.prompts  # the count is what the decoder was really sent
        found[kind] = (result, [o.logits > 0 for o in result.objects])
    grid, coarse = found["grid"], found["coarse"]
    assert grid[0].prompts == 256 and grid[0].decoder_calls == 256
    assert coarse[0].prompts <= 256 // 4  # here ~10x fewer: wall, floor and table cover most points
    min_area = MIN_AREA * scene.labels.size
    assert grid[1] and all(m.sum() >= min_area for m in grid[1])
    for mask in grid[1]:
        assert any(iou(mask, other) >= 0.9 for other in coarse[1])  # nothing the grid finds is lost
    assert len(coarse[1]) == len(grid[1])
    # the scene's objects (not its background) above the minimum area that the grid finds, the
    # coarse search finds too: small ones between coarse points and ones standing on the table
    truth = scene.object_masks(int(np.ceil(min_area)))
    found_by_grid = [t for t in truth if any(iou(t, m) >= 0.5 for m in grid[1])]
    assert found_by_grid and all(any(iou(t, m) >= 0.5 for m in coarse[1]) for t in found_by_grid)


def test_a_point_inside_a_whole_but_outside_its_part_is_still_decoded():
    """SAM answers a point with several masks (part, whole): the smallest accepted one covers
    points, so objects standing on the table (inside the table's filled outline, the 'whole') are
    still decoded and found."""
    on_table_found = 0
    for seed in range(3):
        scene = make_scene(seed)
        h, w = scene.input_size
        crop = ((h * 256 + 1023) // 1024, (w * 256 + 1023) // 1024)
        results = {}
        for kind in ("grid", "coarse"):
            decoder = SceneDecoder()
            results[kind] = search(lambda points: decoder.masks_for(scene.labels, points, crop), 64,
                                   scene.input_size, config(kind))
            assert results[kind].prompts == decoder.prompts
        grid_masks = [o.logits > 0 for o in results["grid"].objects]
        coarse_masks = [o.logits > 0 for o in results["coarse"].objects]
        assert all(any(iou(m, o) >= 0.9 for o in coarse_masks) for m in grid_masks)
        table = _filled(scene.labels == TABLE)
        on_table = [t for t in scene.object_masks(int(np.ceil(MIN_AREA * h * w))) if table[t].all()
                    and any(iou(t, m) >= 0.5 for m in grid_masks)]
        assert all(any(iou(t, m) >= 0.5 for m in coarse_masks) for t in on_table)
        on_table_found += len(on_table)
        assert results["coarse"].prompts < results["grid"].prompts / 2
        assert results["grid"].decoder_calls == 4 and results["coarse"].decoder_calls < 4 + 3  # batches of 64
    assert on_table_found  # the scenes do hold objects on the table that the grid finds


def _filled(mask: np.ndarray) -> np.ndarray:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.zeros(mask.shape, np.uint8), contours, -1, 1, -1).astype(bool)


@pytest.fixture(scope="module")
def tiny_sam(tiny_checkpoint, tmp_path_factory):
    return SamModel.load(tiny_checkpoint, "0" * 64, "cpu", onnx_dir=tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("path", ["onnx", "torch"])
def test_both_decoder_paths_of_real_sam_run_both_searches(tiny_sam, path, monkeypatch):
    """The tiny random SAM on both decoder paths (ONNX per point, batched torch with three masks a
    point): its noise masks count with thresholds at zero, but are too ragged to cover a point once
    shrunk by a cell, so here the coarse search decodes the whole grid in another order and must
    find what the grid finds."""
    if path == "torch":
        monkeypatch.setattr(tiny_sam, "onnx", None)
    else:
        assert tiny_sam.onnx is not None
    rng = np.random.default_rng(0)
    features = rng.normal(size=(256, 64, 64)).astype(np.float32)
    # an 8 x 8 grid (16 coarse points, then 48): SAM's full-size decoder is slow on a shared CPU
    small = dict(points_per_side=8, min_area_fraction=0.0, points_per_batch=32)
    lenient = dict(small, pred_iou_thresh=-10, stability_thresh=0)
    grid = search_everything(tiny_sam, features, (768, 1024), AutomaticConfig(search="grid", **lenient))
    coarse = search_everything(tiny_sam, features, (768, 1024), AutomaticConfig(search="coarse", **lenient))
    assert grid.prompts == 64 and grid.objects and coarse.objects
    assert grid.decoder_calls == (64 if path == "onnx" else 2)
    assert coarse.prompts == 64 and coarse.decoder_calls == (64 if path == "onnx" else 1 + 2)  # passes of 16, 48
    assert sorted(o.score for o in coarse.objects) == pytest.approx(sorted(o.score for o in grid.objects))
    if path == "torch":
        return
    # the default thresholds: nothing random passes, so nothing covers a point and all is decoded
    strict = search_everything(tiny_sam, features, (768, 1024), AutomaticConfig(search="coarse", **small))
    assert strict.objects == [] and strict.prompts == 64


def test_prelabel_search_setting_is_checked():
    assert Settings.from_env({}).prelabel_search == "coarse"
    assert Settings.from_env({"PRELABEL_SEARCH": "GRID"}).prelabel_search == "grid"
    with pytest.raises(SettingsError, match="PRELABEL_SEARCH='spiral' must be one of coarse, grid"):
        Settings.from_env({"PRELABEL_SEARCH": "spiral"})
    with pytest.raises(ValueError, match="search='spiral'"):
        AutomaticConfig(search="spiral")


def test_bench_prelabel_compares_the_searches_without_label_studio(tiny_checkpoint, tmp_path):
    """`bench prelabel --no-rounds`: the segment-everything table and a JSON last line, the real
    (tiny) SAM timed on a scene, no Label Studio started."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run(
        [sys.executable, "-m", "backend.commands.cli", "bench", "prelabel", "--no-rounds", "--everything-scenes", "2",
         "--timed-scenes", "1", "--points-per-side", "8", "--width", "320", "--height", "240", "--device", "cpu",
         "--threads", "1"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SAM_CHECKPOINT": str(tiny_checkpoint)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "STAND-IN decoder" in run.stdout and "coarse is" in run.stdout
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    total = figures["everything"]["stand_in"]["total"]
    assert total["grid_prompts"] == 2 * 64 and total["coarse_prompts"] < total["grid_prompts"]
    assert total["grid_objects_coarse_finds"] == total["grid_found"] > 0
    real = figures["everything"]["real_decoder"]
    assert real["decoder"] == "onnxruntime" and real["grid"]["prompts_per_image"] == 64
    # timed on scene 0: the real decoder's run sent the prompts the stand-in's run of scene 0 did
    assert real["coarse"]["prompts_per_image"] == figures["everything"]["stand_in"]["scenes"][0]["coarse_prompts"]
    assert real["coarse"]["seconds_per_image"] > 0  # speeds are the bench's, not a test's
    assert figures["rounds"] == []
