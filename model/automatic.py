"""Segment everything over a cached embedding: a grid of point prompts, SAM's quality filters
(predicted IoU, stability), de-duplication by box NMS, and a minimum object area.

Same recipe as segment_anything's SamAutomaticMaskGenerator, but it starts from a stored
embedding (no encoder run) and judges stability on the low-res logits, which is cheaper.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchvision.ops import nms

from model.masks import logits_at_input
from model.prompts import ModelPrompt
from model.segmenter import Segmenter

LOW_RES = 256


@dataclasses.dataclass(frozen=True)
class AutomaticConfig:
    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.86
    stability_thresh: float = 0.90
    stability_offset: float = 1.0
    nms_iou: float = 0.7
    min_area_fraction: float = 0.0005  # of the image; smaller objects are dropped
    max_objects: int = 100


@dataclasses.dataclass(frozen=True)
class Found:
    logits: np.ndarray  # at input resolution (long side 1024)
    score: float
    area_fraction: float


def grid_points(points_per_side: int, input_size: tuple[int, int]) -> np.ndarray:
    """Cell centres of an n x n grid over the image, in input pixels (x, y)."""
    h, w = input_size
    steps = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(steps * w, steps * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def stability(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """IoU of the mask thresholded at +offset and at -offset: high when the edge is sharp."""
    high = (logits > offset).flatten(1).sum(1).float()
    low = (logits > -offset).flatten(1).sum(1).float()
    return torch.where(low > 0, high / low.clamp(min=1), torch.zeros_like(low))


@torch.inference_mode()
def segment_everything(model: Segmenter, features: np.ndarray, input_size: tuple[int, int],
                       config: AutomaticConfig = AutomaticConfig()) -> list[Found]:
    h, w = input_size
    side = max(h, w)  # the padded input square (1024 for SAM, 512 for EfficientViT-SAM L)
    crop = ((h * LOW_RES + side - 1) // side, (w * LOW_RES + side - 1) // side)  # the unpadded part of the 256 grid
    points = grid_points(config.points_per_side, input_size)
    if model.onnx is not None:
        logits, scores = _candidates_onnx(model, features, points, crop, input_size)
    else:
        logits, scores = _candidates_torch(model, features, points, crop, config.points_per_batch, input_size)
    keep = (scores >= config.pred_iou_thresh) & (stability(logits, config.stability_offset) >= config.stability_thresh)
    logits, scores = logits[keep], scores[keep]
    masks = logits > 0
    nonempty = masks.flatten(1).any(1)
    logits, scores, masks = logits[nonempty], scores[nonempty], masks[nonempty]
    if len(logits) == 0:
        return []
    keep = nms(_boxes(masks).float(), scores.float(), config.nms_iou)

    found = []
    for i in keep.tolist():
        full = _upscale(logits[i], input_size)
        area_fraction = float((full > 0).mean())
        if area_fraction < config.min_area_fraction:
            continue
        found.append(Found(full, float(scores[i]), area_fraction))
        if len(found) == config.max_objects:
            break
    return found


def _candidates_onnx(model: Segmenter, features: np.ndarray, points: np.ndarray, crop,
                     input_size) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt at a time through ONNX Runtime (the best of SAM's three masks each): on a CPU
    that is about 60 ms a point, against ~140 ms a point for the batched torch decoder."""
    logits, scores = [], []
    for point in points:
        low, score = model.decode(features, ModelPrompt(point[None], np.ones(1, np.int64), None), input_size)
        logits.append(torch.from_numpy(low[: crop[0], : crop[1]].copy()))
        scores.append(score)
    return torch.stack(logits), torch.tensor(scores)


def _candidates_torch(model: Segmenter, features: np.ndarray, points: np.ndarray, crop,
                      batch_size: int, input_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of prompts, all three masks each (the GPU path; every family's decode_points)."""
    logits, scores = [], []
    for start in range(0, len(points), batch_size):
        low, iou = model.decode_points(features, points[start:start + batch_size], input_size)
        logits.append(low[:, : crop[0], : crop[1]])
        scores.append(iou)
    return torch.cat(logits), torch.cat(scores)


def _upscale(low_res_crop: torch.Tensor, input_size: tuple[int, int]) -> np.ndarray:
    """Cropped low-res logits -> logits at input size, placed the way the padded 256 grid maps to the input square."""
    padded = torch.full((LOW_RES, LOW_RES), -20.0, dtype=low_res_crop.dtype)
    padded[: low_res_crop.shape[0], : low_res_crop.shape[1]] = low_res_crop.cpu()
    return logits_at_input(padded.numpy(), input_size)


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """x0, y0, x1, y1 of each mask (masks are non-empty)."""
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    idx_r = torch.arange(masks.shape[1], device=masks.device)
    idx_c = torch.arange(masks.shape[2], device=masks.device)
    y0 = torch.where(rows, idx_r, masks.shape[1]).min(1).values
    y1 = torch.where(rows, idx_r, -1).max(1).values
    x0 = torch.where(cols, idx_c, masks.shape[2]).min(1).values
    x1 = torch.where(cols, idx_c, -1).max(1).values
    return torch.stack([x0, y0, x1 + 1, y1 + 1], dim=1)
