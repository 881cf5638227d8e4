"""Masks -> Label Studio regions: brush RLE or a bitmask PNG at full resolution, polygons in percent."""

from __future__ import annotations

import uuid

import numpy as np

from backend.labelstudio.bitmask import mask_to_data_url
from backend.labelstudio.label_config import OutputTag
from backend.labelstudio.rle import mask_to_rle
from model import masks


def _region(tag: OutputTag, to_name: str, original_size: tuple[int, int], value: dict, score: float) -> dict:
    height, width = original_size
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": tag.name,
        "to_name": to_name,
        "type": tag.region_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "score": score,
        "readonly": False,
    }


def _pixel_value(tag: OutputTag, label: str, mask: np.ndarray) -> dict:
    """A full-resolution mask as the tag's kind carries it: brush RLE, or a bitmask PNG data URL."""
    if tag.kind == "bitmask":
        return {"imageDataURL": mask_to_data_url(mask), "bitmasklabels": [label]}
    if tag.kind == "brush":
        return {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    raise ValueError(f"a {tag.kind} tag takes no pixel mask")


def pixel_region(
    tag: OutputTag, to_name: str, label: str, logits_input: np.ndarray, original_size: tuple[int, int], score: float
) -> dict:
    """A brush or bitmask region (as the tag's kind says) of the mask at the image's full resolution."""
    full = masks.mask_at_original(logits_input, original_size)
    return _region(tag, to_name, original_size, _pixel_value(tag, label, full), score)


# The decoder answers on a 256 x 256 grid over its input square (1024 px for SAM: one cell is 4 x 4
# input pixels; 512 px for EfficientViT-SAM L: 2 x 2). A part of a whole-image answer smaller than
# one cell is interpolation between cells, never a structure the decoder saw (on a 20 MP photo one
# cell is ~450 full-resolution pixels, above POLYGON_MIN_AREA)
_DECODER_GRID = 256


def polygon_regions(
    tag: OutputTag,
    to_name: str,
    label: str,
    logits_input: np.ndarray,
    original_size: tuple[int, int],
    score: float,
    tolerance: float,
    min_area_full_res: float,
    max_vertices: int = 0,
    max_parts: int = 0,
) -> list[dict]:
    """One polygon region per connected part, traced on a mask of at least 1024 px on its long side
    (IoU 0.997 vs full res, 3 ms), largest first, at most `max_parts` of them with `max_vertices` in
    all (0: no bound)."""
    mask = masks.mask_at_input(masks.logits_for_tracing(logits_input, original_size))
    in_h, in_w = mask.shape
    height, width = original_size
    # one decoder cell in the traced mask's pixels: the grid spans the input square, whose side is
    # the traced mask's long side
    cell_pixels = (max(in_h, in_w) / _DECODER_GRID) ** 2
    min_area = max(min_area_full_res * (in_h * in_w) / (height * width), cell_pixels)
    regions = []
    for poly in masks.polygons(mask, tolerance, min_area, max_vertices, max_parts, keep_largest=True):
        # pixel centres -> percent of the image
        points = ((poly + 0.5) / np.array([in_w, in_h]) * 100.0).round(4).tolist()
        value = {"points": points, "closed": True, "polygonlabels": [label]}
        regions.append(_region(tag, to_name, original_size, value, score))
    return regions


def _meta_region(tag: OutputTag, to_name: str, original_size, value: dict, score: float, meta: dict | None) -> dict:
    region = _region(tag, to_name, original_size, value, score)
    if meta:
        region["meta"] = dict(meta)  # Label Studio keeps a region's meta through editing and submit
    return region


def pixel_region_from_mask(tag: OutputTag, to_name: str, label: str, mask: np.ndarray, score: float,
                           meta: dict | None = None) -> dict:
    """A brush or bitmask region from a full-resolution mask (the zoom path's, already pixel-accurate)."""
    return _meta_region(tag, to_name, mask.shape, _pixel_value(tag, label, mask), score, meta)


def polygon_regions_from_mask(tag: OutputTag, to_name: str, label: str, mask: np.ndarray, score: float,
                              tolerance: float, min_area: float, meta: dict | None = None,
                              max_vertices: int = 0, max_parts: int = 0) -> list[dict]:
    """Polygons traced on a full-resolution mask (tolerance and min_area in its pixels), on the mask's
    bounding box only: a 12 px pit on a 20 MP photo costs microseconds, not a 20 MP contour search.
    Largest part first (kept even below min_area), bounded like polygon_regions."""
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return []
    y0, x0 = int(rows[0]), int(cols[0])
    part = np.pad(mask[y0:int(rows[-1]) + 1, x0:int(cols[-1]) + 1], 1)  # contours never touch the crop's border
    regions = []
    for poly in masks.polygons(part, tolerance, min_area, max_vertices, max_parts, keep_largest=True):
        points = ((poly + np.array([x0 - 0.5, y0 - 0.5])) / np.array([width, height]) * 100.0).round(5).tolist()
        value = {"points": points, "closed": True, "polygonlabels": [label]}
        regions.append(_meta_region(tag, to_name, (height, width), value, score, meta))
    return regions
