"""Label Studio regions and annotations read back: which annotation of a task counts, and a brush or
polygon region as a mask. Training (corrections.py) and the COCO export use the same rules."""

from __future__ import annotations

import cv2
import numpy as np

from backend.labelstudio.rle import rle_to_mask


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
    """(label, bool mask) of a brush or polygon region, at `size` (height, width) or at the image's
    original size; None for other region types or a region without its image size."""
    value = region.get("value") or {}
    kind = region.get("type")
    oh, ow = region.get("original_height"), region.get("original_width")
    if not isinstance(oh, (int, float)) or not isinstance(ow, (int, float)) or oh <= 0 or ow <= 0:
        return None
    oh, ow = int(oh), int(ow)
    h, w = size or (oh, ow)
    if kind == "brushlabels" and value.get("format") == "rle" and isinstance(value.get("rle"), list):
        full = rle_to_mask(value["rle"], oh, ow)
        if (h, w) == (oh, ow):
            mask = full
        else:
            interpolation = cv2.INTER_AREA if oh > h else cv2.INTER_NEAREST
            mask = cv2.resize(full.astype(np.uint8), (w, h), interpolation=interpolation) > 0
        labels = value.get("brushlabels") or []
    elif kind == "polygonlabels" and isinstance(value.get("points"), list) and len(value["points"]) >= 3:
        pts = np.asarray(value["points"], dtype=np.float64) / 100 * [w, h]
        canvas = np.zeros((h, w), np.uint8)
        cv2.fillPoly(canvas, [np.round(pts - 0.5).astype(np.int32).reshape(-1, 1, 2)], 1)
        mask = canvas.astype(bool)
        labels = value.get("polygonlabels") or []
    else:
        return None
    return (labels[0] if labels else ""), mask
