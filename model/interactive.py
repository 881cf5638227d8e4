"""Simulated annotators and the metrics of interactive segmentation.

Clicks follow the standard NoC protocol (Xu et al. 2016, RITM): the first click is the interior
point farthest from the object's boundary; every next click goes to the point farthest from the
boundary of the largest error region, positive if that region was missed, negative if it was
wrongly included. A box is the object's bounding box with each side jittered.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from model.prompts import ModelPrompt

NOC_CAP = 20


@dataclasses.dataclass(frozen=True)
class Click:
    x: float
    y: float
    positive: bool


def _deepest_point(region: np.ndarray) -> tuple[int, int]:
    """The pixel of `region` farthest from its boundary (and from the image border)."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def first_click(gt: np.ndarray) -> Click:
    x, y = _deepest_point(gt)
    return Click(x + 0.5, y + 0.5, True)


def next_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """Click at the centre of the largest error region; None when the mask is already perfect."""
    missed, extra = gt & ~pred, pred & ~gt
    best, best_area, positive = None, 0, True
    for errors, is_missed in ((missed, True), (extra, False)):
        if not errors.any():
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(errors.astype(np.uint8), connectivity=8)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[largest, cv2.CC_STAT_AREA] > best_area:
            best, best_area, positive = labels == largest, stats[largest, cv2.CC_STAT_AREA], is_missed
    if best is None:
        return None
    x, y = _deepest_point(best)
    return Click(x + 0.5, y + 0.5, positive)


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def jittered_box(gt: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> np.ndarray:
    """The object's box with each side moved by up to `jitter` of the box's size, as a hand-drawn box is."""
    x0, y0, x1, y1 = bounding_box(gt)
    w, h = x1 - x0, y1 - y0
    moved = np.array([x0, y0, x1, y1]) + rng.uniform(-jitter, jitter, 4) * np.array([w, h, w, h])
    height, width = gt.shape
    x0, x1 = sorted(np.clip(moved[[0, 2]], 0, width))
    y0, y1 = sorted(np.clip(moved[[1, 3]], 0, height))
    return np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], dtype=np.float32)


def click_prompt(clicks: list[Click], box: np.ndarray | None = None) -> ModelPrompt:
    points = np.array([[c.x, c.y] for c in clicks], dtype=np.float32) if clicks else None
    labels = np.array([int(c.positive) for c in clicks], dtype=np.int64) if clicks else None
    return ModelPrompt(points, labels, box)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def _inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    m = mask.astype(np.uint8)
    eroded = cv2.erode(np.pad(m, 1), np.ones((3, 3), np.uint8), iterations=width)[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al. 2021): IoU of the bands within d pixels inside each contour,
    d = 2 % of the image diagonal. It punishes wrong edges that region IoU hardly sees on big objects."""
    d = max(1, int(round(dilation_ratio * np.hypot(*gt.shape))))
    return iou(_inner_boundary(pred, d), _inner_boundary(gt, d))


def noc(segment, gt: np.ndarray, thresholds=(0.85, 0.90), cap: int = NOC_CAP) -> dict[float, int]:
    """Clicks needed to reach each IoU threshold (cap when never reached). `segment(clicks) -> mask`."""
    clicks = [first_click(gt)]
    needed: dict[float, int] = {}
    for count in range(1, cap + 1):
        pred = segment(clicks)
        score = iou(pred, gt)
        for t in thresholds:
            if t not in needed and score >= t:
                needed[t] = count
        if len(needed) == len(thresholds) or count == cap:
            break
        click = next_click(pred, gt)
        if click is None:
            break
        clicks.append(click)
    return {t: needed.get(t, cap) for t in thresholds}
