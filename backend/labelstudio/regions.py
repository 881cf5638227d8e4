"""Label Studio regions and annotations read back: which annotation of a task counts, and a brush,
bitmask or polygon region as a mask. Training (corrections.py) and the COCO export use the same rules."""

from __future__ import annotations

import cv2
import numpy as np

from backend.labelstudio.bitmask import data_url_to_mask
from backend.labelstudio.label_config import REGION_TYPES
from backend.labelstudio.rle import rle_to_mask

MASK_REGION_TYPES = tuple(REGION_TYPES.values())  # the region types read as masks: every output kind's


def newest(items: list) -> dict | None:
    """The most recently updated of a task's annotations or predictions (ties: the higher id)."""
    items = [i for i in items or [] if isinstance(i, dict)]
    return max(items, key=lambda i: (str(i.get("updated_at") or i.get("created_at") or ""), i.get("id") or 0),
               default=None)


def newest_annotation(task: dict) -> dict | None:
    """The task's ground truth: its newest annotation that was not cancelled (skipped). An empty one
    counts too: the annotator said there is nothing to mark."""
    return newest([a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")])


def region_mask(region: dict, size: tuple[int, int] | None = None) -> tuple[str, np.ndarray] | None:
    """(label, bool mask) of a brush, bitmask or polygon region, at `size` (height, width) or at the
    image's original size; None for other region types or a region without its image size.
    InvalidRegion for a bitmask whose PNG is not one of the image's size (see bitmask.py)."""
    value = region.get("value") or {}
    kind = region.get("type")
    oh, ow = region.get("original_height"), region.get("original_width")
    if not isinstance(oh, (int, float)) or not isinstance(ow, (int, float)) or oh <= 0 or ow <= 0:
        return None
    oh, ow = int(oh), int(ow)
    h, w = size or (oh, ow)
    if kind == "brushlabels" and value.get("format") == "rle" and isinstance(value.get("rle"), list):
        mask = _resized(rle_to_mask(value["rle"], oh, ow), h, w)
        labels = value.get("brushlabels") or []
    elif kind == "bitmasklabels" and "imageDataURL" in value:
        mask = _resized(data_url_to_mask(value["imageDataURL"], oh, ow), h, w)
        labels = value.get("bitmasklabels") or []
    elif kind == "polygonlabels" and isinstance(value.get("points"), list) and len(value["points"]) >= 3:
        pts = np.asarray(value["points"], dtype=np.float64) / 100 * [w, h]
        canvas = np.zeros((h, w), np.uint8)
        cv2.fillPoly(canvas, [np.round(pts - 0.5).astype(np.int32).reshape(-1, 1, 2)], 1)
        mask = canvas.astype(bool)
        labels = value.get("polygonlabels") or []
    else:
        return None
    return (labels[0] if labels else ""), mask


def _resized(full: np.ndarray, h: int, w: int) -> np.ndarray:
    if full.shape == (h, w):
        return full
    interpolation = cv2.INTER_AREA if full.shape[0] > h else cv2.INTER_NEAREST
    return cv2.resize(full.astype(np.uint8), (w, h), interpolation=interpolation) > 0
