"""`sam-backend export --project ID --format coco`: a project's masks as COCO instance polygons,
so teams labelling in CVAT can import the drafts (CVAT: Import dataset -> COCO 1.0)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backend.errors import InvalidRegion
from backend.labelstudio.label_config import ProjectConfig, parse_label_config
from backend.labelstudio.client import LabelStudioApi
from backend.labelstudio.regions import MASK_REGION_TYPES, newest, newest_annotation, region_mask
from model import masks

SOURCES = ("predictions", "annotations")


def _pick(task: dict, source: str, model_version: str | None) -> dict | None:
    """The task's ground truth (newest annotation not cancelled), or its newest prediction (of
    `model_version` if given)."""
    if source == "annotations":
        return newest_annotation(task)
    items = [i for i in task.get("predictions") or [] if isinstance(i, dict)]
    return newest([i for i in items if i.get("model_version") == model_version] if model_version else items)


def _polygon_pixels(points: list, width: int, height: int) -> np.ndarray:
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) / 100.0 * np.array([width, height])


def _area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def region_shape(region: dict) -> tuple[list[np.ndarray], float, list[float]] | None:
    """Pixel polygons, area and bbox of one Label Studio polygon, brush or bitmask region (None for
    others).

    A brush or bitmask mask's area and bbox are counted on its pixels, as COCO counts masks; its
    polygons are the outer contours through boundary pixel centres. A bitmask that is not a PNG of
    the image's size raises InvalidRegion (the command reports it, naming the task).
    """
    width, height = int(region.get("original_width") or 0), int(region.get("original_height") or 0)
    value = region.get("value") or {}
    if width <= 0 or height <= 0:
        return None
    if region.get("type") == "polygonlabels" and len(value.get("points") or []) >= 3:
        poly = _polygon_pixels(value["points"], width, height)
        (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
        return [poly], _area(poly), [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    parsed = region_mask(region) if region.get("type") in ("brushlabels", "bitmasklabels") else None
    if parsed is not None:
        mask = parsed[1]
        polygons = masks.polygons(mask, tolerance=1.0, min_area=1)
        if not polygons:
            return None
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        return polygons, float(mask.sum()), bbox
    return None


def to_coco(tasks: list[dict], config: ProjectConfig, source: str, model_version: str | None = None) -> dict:
    categories = {label: i + 1 for i, label in enumerate(config.all_labels)}
    images, annotations = [], []
    for task in tasks:
        picked = _pick(task, source, model_version)
        regions = [r for r in (picked or {}).get("result") or [] if r.get("type") in MASK_REGION_TYPES]
        size = next(((r["original_width"], r["original_height"]) for r in regions if r.get("original_width")), None)
        image = {"id": task["id"], "file_name": str((task.get("data") or {}).get(config.image_field, ""))}
        if size:
            image.update(width=size[0], height=size[1])
        images.append(image)
        for region in regions:
            value = region.get("value") or {}
            label = (value.get(region.get("type")) or [None])[0]
            try:
                shape = region_shape(region)
            except InvalidRegion as exc:
                raise InvalidRegion(f"task {task['id']}: {exc.message}") from None
            if label not in categories or shape is None:
                continue
            polygons, area, bbox = shape
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": task["id"],
                "category_id": categories[label],
                "segmentation": [p.round(2).ravel().tolist() for p in polygons],
                "area": round(area, 2),
                "bbox": [round(v, 2) for v in bbox],
                "iscrowd": 0,
                "score": (picked or {}).get("score"),
            })
    return {
        "info": {"description": f"sam-backend export of {source}", "version": model_version or "",
                 "date_created": datetime.now(timezone.utc).isoformat()},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": label, "supercategory": ""} for label, i in categories.items()],
    }


def export_project(settings, project_id: int, source: str, model_version: str | None, out_path: str,
                   out=sys.stdout) -> int:
    # a wrong project id, a refused token or an unusable config: the CLI reports the typed error
    api = LabelStudioApi.from_settings(settings)
    config = parse_label_config(api.label_config(project_id))
    tasks = [api.task(task_id) for task_id in api.task_ids(project_id)]
    coco = to_coco(tasks, config, source, model_version)
    Path(out_path).write_text(json.dumps(coco))
    print(f"project {project_id}: {len(coco['images'])} images, {len(coco['annotations'])} objects from "
          f"{source} -> {out_path}", file=out)
    return 0
