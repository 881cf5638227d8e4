"""Answers sized for Label Studio's page: polygon vertices and parts per answer are bounded, the
largest parts are kept, and a smooth object's outline survives the bound (issue 13)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from backend.bench.click import smooth_logits
from backend.labelstudio.label_config import OutputTag
from backend.labelstudio.results import polygon_regions, polygon_regions_from_mask
from backend.settings import Settings
from model import masks
from model.prompts import preprocess_shape

TAG = OutputTag("poly", "polygon", ("Object",))


def ragged_logits(input_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """What random SAM weights answer: noise on the decoder's 256 grid, upscaled like a real answer."""
    rng = np.random.default_rng(seed)
    low = cv2.GaussianBlur(rng.normal(size=(256, 256)).astype(np.float32), (0, 0), 1.2)
    return masks.logits_at_input(low, input_size)


def rasterize(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(p).astype(np.int32) for p in polys], 1)
    return canvas.astype(bool)


def test_a_ragged_answer_fits_the_vertex_budget_and_keeps_its_largest_parts():
    mask = ragged_logits((1024, 1024)) > 0
    unbounded = masks.polygons(mask, 1.0, 0)
    assert len(unbounded) > 100 and sum(map(len, unbounded)) > 5000  # what the page used to get
    polys = masks.polygons(mask, 1.0, 0, max_vertices=600, max_parts=12)
    assert 0 < len(polys) <= 12
    assert sum(map(len, polys)) <= 600
    # the parts kept are the largest connected parts (holes filled: a polygon has none), largest first
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = cv2.drawContours(np.zeros(mask.shape, np.uint8), contours, -1, 1, thickness=-1)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(filled, connectivity=8)
    by_size = [int(i) + 1 for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")]
    matched = []
    for poly in polys:
        inside = labels[rasterize([poly], mask.shape) & mask]
        matched.append(int(np.bincount(inside[inside > 0]).argmax()))
    assert matched == by_size[:len(polys)]
    assert count - 1 > 100  # and most parts were left out


def test_a_smooth_outline_survives_a_tight_budget():
    yy, xx = np.mgrid[0:1024, 0:1024]
    mask = ((xx - 500) / 320.0) ** 2 + ((yy - 480) / 210.0) ** 2 <= 1
    mask |= ((xx - 760) / 90.0) ** 2 + ((yy - 480) / 120.0) ** 2 <= 1  # a bump: not a plain ellipse
    free = masks.polygons(mask, 0.0, 0)[0]
    assert len(free) > 1500  # every boundary pixel: over a 40-vertex budget by far
    [poly] = masks.polygons(mask, 0.0, 0, max_vertices=40)
    assert 3 <= len(poly) <= 40
    drawn = rasterize([poly], mask.shape)
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou >= 0.97, iou


def test_too_many_parts_for_the_budget_drop_the_smallest_parts():
    mask = np.zeros((400, 400), bool)
    for i in range(10):
        side = 10 + 3 * i
        mask[20 + 35 * i: 20 + 35 * i + side, 20: 20 + side] = True  # ten squares, growing
    polys = masks.polygons(mask, 1.0, 0, max_vertices=12)  # room for three quadrilaterals
    assert len(polys) == 3 and sum(map(len, polys)) <= 12
    assert [int(cv2.contourArea(p.astype(np.float32))) for p in polys] == [
        int(cv2.contourArea(p.astype(np.float32))) for p in masks.polygons(mask, 1.0, 0)[:3]]


def test_the_largest_part_of_a_click_is_kept_below_min_area():
    mask = np.zeros((300, 300), bool)
    mask[100:108, 200:208] = True  # a 64 px pit, below POLYGON_MIN_AREA
    assert masks.polygons(mask, 1.0, 100) == []
    regions = polygon_regions_from_mask(TAG, "image", "Object", mask, 0.9, 1.0, 100)
    assert len(regions) == 1
    points = np.array(regions[0]["value"]["points"]) / 100 * 300
    assert points.min(axis=0).round().tolist() == [200, 100]


def test_default_settings_bound_a_ragged_click_at_1_and_20_mp():
    defaults = Settings()
    assert defaults.polygon_max_vertices == 1000 and defaults.polygon_max_parts == 5
    for height, width in ((800, 1280), (3648, 5472)):
        input_size = preprocess_shape(height, width)
        ragged = ragged_logits(input_size, seed=width)
        before = polygon_regions(TAG, "image", "Object", ragged, (height, width), 0.9,
                                 defaults.polygon_tolerance, defaults.polygon_min_area)
        after = polygon_regions(TAG, "image", "Object", ragged, (height, width), 0.9, defaults.polygon_tolerance,
                                defaults.polygon_min_area, defaults.polygon_max_vertices, defaults.polygon_max_parts)
        assert len(before) > 50  # unbounded: the page drew every speck
        assert len(after) <= 5 and sum(len(r["value"]["points"]) for r in after) <= 1000
        # a smooth object at the same size keeps its polygon as it was
        smooth = masks.logits_at_input(smooth_logits(256, input_size), input_size)
        plain = polygon_regions(TAG, "image", "Object", smooth, (height, width), 0.9, 1.0, 100)
        bounded = polygon_regions(TAG, "image", "Object", smooth, (height, width), 0.9, 1.0, 100, 1000, 5)
        assert [r["value"]["points"] for r in bounded] == [r["value"]["points"] for r in plain]


def test_a_click_through_the_app_honours_the_settings(settings, make_client, image_server):
    """POLYGON_MAX_VERTICES / POLYGON_MAX_PARTS reach the click path (real app, real Redis, small SAM)."""
    from tests.test_api import LOCAL_IMAGE, keypoint_body
    from tests.conftest import make_image

    image_server.add(LOCAL_IMAGE, make_image(80, 60))
    free, _ = make_client(settings.replace(output_type="polygon", polygon_min_area=0, polygon_max_vertices=0,
                                           polygon_max_parts=0))
    bounded, _ = make_client(settings.replace(output_type="polygon", polygon_min_area=0, polygon_max_vertices=8,
                                              polygon_max_parts=1))
    unbounded = free.post("/predict", json=keypoint_body()).json["results"][0]["result"]
    answer = bounded.post("/predict", json=keypoint_body()).json["results"][0]["result"]
    assert sum(len(r["value"]["points"]) for r in unbounded) > 8  # the small SAM's speckled mask
    assert len(answer) == 1 and 3 <= len(answer[0]["value"]["points"]) <= 8


def test_a_small_input_models_polygon_is_traced_at_1024_px_and_follows_the_full_resolution_mask():
    """EfficientViT-SAM L answers on a 512 px input: its polygons are traced on logits upsampled to
    1024 px, so a smooth object's outline has half the step it had on the 512 px mask."""
    height, width = 800, 1280
    in_h, in_w = 320, 512
    yy, xx = np.mgrid[0:in_h, 0:in_w].astype(np.float32)
    logits = 60.0 - np.hypot((xx - 251.3) * 1.3, yy - 161.7)  # a smooth ellipse, edges between pixels
    full = masks.mask_at_original(logits, (height, width))

    def iou_of(regions) -> float:
        drawn = np.zeros((height, width), np.uint8)
        for region in regions:
            pts = np.array(region["value"]["points"]) / 100.0 * np.array([width, height]) - 0.5
            cv2.fillPoly(drawn, [np.round(pts * 16).astype(np.int32)], 1, shift=4)
        drawn = drawn.astype(bool)
        return (drawn & full).sum() / (drawn | full).sum()

    traced = polygon_regions(TAG, "image", "Object", logits, (height, width), 0.9, 0.5, 100)
    at_input = [dict(r, value=dict(r["value"], points=((p + 0.5) / np.array([in_w, in_h]) * 100).tolist()))
                for r, p in zip(traced, masks.polygons(logits > 0, 0.5, 1))]
    assert len(traced) == 1
    assert iou_of(traced) > 0.995
    assert iou_of(traced) > iou_of(at_input)


def test_a_click_answers_with_at_most_the_default_parts_the_largest(settings, make_client, image_server):
    """With the default POLYGON_MAX_PARTS a speckled click becomes at most 5 polygon regions (the page
    spends its time per region), and they are the largest parts of the unbounded answer, unchanged."""
    from tests.test_api import LOCAL_IMAGE, keypoint_body
    from tests.conftest import make_image

    assert Settings().polygon_max_parts == 5
    image_server.add(LOCAL_IMAGE, make_image(80, 60))
    free, _ = make_client(settings.replace(output_type="polygon", polygon_min_area=0, polygon_max_vertices=0,
                                           polygon_max_parts=0))
    default, _ = make_client(settings.replace(output_type="polygon", polygon_min_area=0))
    unbounded = free.post("/predict", json=keypoint_body()).json["results"][0]["result"]
    answer = default.post("/predict", json=keypoint_body()).json["results"][0]["result"]
    assert len(unbounded) > 5  # the small SAM's speckled mask
    assert len(answer) == 5
    assert [r["value"]["points"] for r in answer] == [r["value"]["points"] for r in unbounded[:5]]


@pytest.mark.parametrize("share, parts", [(1, 5), (2, 2), (5, 1), (12, 1)])
def test_a_drafts_objects_share_the_parts(settings, share, parts):
    """A draft's objects share POLYGON_MAX_PARTS (the page draws them all at once), at least one each;
    the vertices likewise, at least 8 each."""
    from backend.pipeline.predict import Predictor

    predictor = Predictor.__new__(Predictor)  # the bounds need the settings only
    predictor.settings = settings
    assert predictor._polygon_bounds(share) == {"max_vertices": max(1000 // share, 8), "max_parts": parts}
    predictor.settings = settings.replace(polygon_max_parts=0, polygon_max_vertices=0)
    assert predictor._polygon_bounds(share) == {"max_vertices": 0, "max_parts": 0}
