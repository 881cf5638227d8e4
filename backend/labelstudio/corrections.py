"""Submitted annotations as ground truth: Label Studio regions -> one mask per object, in the
encoder's input frame; and how far each submitted annotation moved from the draft it started from."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from backend.errors import InvalidRegion
from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.regions import newest_annotation, region_mask
from model.interactive import iou
from model.prompts import preprocess_shape
from model.sam import IMAGE_SIZE

log = logging.getLogger(__name__)

MIN_OBJECT_PIXELS = 16  # in the input frame: smaller regions are slips of the brush, not objects
UNCHANGED_IOU = 0.95


@dataclasses.dataclass
class ObjectMask:
    task_id: int
    label: str
    mask: np.ndarray  # bool, encoder input size


def _input_size(region: dict, long_side: int = IMAGE_SIZE) -> tuple[int, int] | None:
    width, height = region.get("original_width"), region.get("original_height")
    if not isinstance(width, (int, float)) or not isinstance(height, (int, float)) or width <= 0 or height <= 0:
        return None
    return preprocess_shape(int(height), int(width), long_side)


def task_objects(task: dict, config: ProjectConfig, long_side: int = IMAGE_SIZE) -> list[ObjectMask]:
    """Every brush / bitmask / polygon object of the task's newest submitted annotation, in the input frame of an
    encoder whose input side is `long_side`."""
    annotation = newest_annotation(task)
    if annotation is None:
        return []
    found = []
    for region in annotation.get("result") or []:
        if region.get("to_name") != config.image_name:
            continue
        size = _input_size(region, long_side)
        parsed = _readable(region, size, task.get("id")) if size else None
        if parsed is not None and np.count_nonzero(parsed[1]) >= MIN_OBJECT_PIXELS:
            found.append(ObjectMask(task["id"], parsed[0], parsed[1]))
    return found


def _readable(region: dict, size, task_id=None):
    """region_mask, or None for a region that cannot be read (a bitmask that is not a PNG of its
    image's size): one bad region from Label Studio costs that region, not the training run."""
    try:
        return region_mask(region, size)
    except InvalidRegion as exc:
        log.warning("task %s: skipping a region: %s", task_id, exc.message)
        return None


def _union(result: list, input_size) -> np.ndarray | None:
    masks = []
    for region in result or []:
        parsed = _readable(region, input_size) if isinstance(region, dict) else None
        if parsed is not None:
            masks.append(parsed[1])
    return np.logical_or.reduce(masks) if masks else None


def draft_changes(tasks: list[dict]) -> dict[str, list[float]]:
    """IoU between each submitted annotation and the prediction it was started from, per model version."""
    by_version: dict[str, list[float]] = {}
    for task in tasks:
        predictions = {p.get("id"): p for p in task.get("predictions") or []}
        for annotation in task.get("annotations") or []:
            parent = annotation.get("parent_prediction")
            prediction = predictions.get(parent)
            if prediction is None or annotation.get("was_cancelled") or not prediction.get("model_version"):
                continue
            sizes = [_input_size(r) for r in (annotation.get("result") or []) + (prediction.get("result") or [])
                     if isinstance(r, dict)]
            size = next((s for s in sizes if s), None)
            if size is None:
                continue
            ours, theirs = _union(prediction.get("result"), size), _union(annotation.get("result"), size)
            empty = np.zeros(size, bool)
            score = iou(empty if ours is None else ours, empty if theirs is None else theirs)
            by_version.setdefault(prediction["model_version"], []).append(score)
    return by_version


def acceptance_summary(by_version: dict[str, list[float]]) -> dict[str, dict]:
    return {version: {"corrections": len(scores), "mean_iou": float(np.mean(scores)),
                      "unchanged": float(np.mean([s >= UNCHANGED_IOU for s in scores]))}
            for version, scores in by_version.items()}
