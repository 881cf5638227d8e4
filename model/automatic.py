"""Segment everything over a cached embedding: point prompts over a grid, SAM's quality filters
(predicted IoU, stability), de-duplication by box NMS, and a minimum object area.

Same recipe as segment_anything's SamAutomaticMaskGenerator, but it starts from a stored
embedding (no encoder run) and judges stability on the low-res logits, which is cheaper.

Search (`AutomaticConfig.search`): "grid" decodes every grid point, as SAM's generator does.
"coarse" decodes a subset of the same grid, coarse to fine: first every 4th point in both
directions (about 4 x 4), then every 2nd, then the rest, and skips a point that already lies
inside a mask accepted earlier (passed both filters). A skipped point would mostly have answered
that same mask again, which NMS then throws away: on a CPU the decoder costs ~50 ms a point and
dominates a draft once the encoder is fast. What covers a point is, of each decoded point's
accepted masks, the smallest (SAM answers a point with a part, the object and a larger whole: a
point inside the whole but outside the part may name another part, so it is still decoded),
shrunk by one low-res cell so a point on a mask's edge is decoded too. Only the decoder calls
change: the same filters, NMS, minimum area and object cap apply to what was decoded. Objects
nested inside a region that is accepted with them in it (a logo on a shirt whose mask includes
the logo) can be missed when no decoded point lands on them; `search="grid"` keeps SAM's recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import numpy as np
import torch
from torchvision.ops import nms

from model.masks import logits_at_input
from model.prompts import ModelPrompt
from model.segmenter import Segmenter

LOW_RES = 256
SEARCHES = ("coarse", "grid")
COARSEST_SIDE = 4  # the coarse search's first pass has about this many points a side


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
    search: str = "coarse"  # see the module docstring

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r} must be one of {', '.join(SEARCHES)}")


@dataclasses.dataclass(frozen=True)
class Found:
    logits: np.ndarray  # at input resolution (long side 1024)
    score: float
    area_fraction: float


@dataclasses.dataclass
class Search:
    """What a search found and what it cost."""

    objects: list[Found]
    prompts: int  # grid points decoded
    decoder_calls: int  # batches sent to the decoder (one per point on the per-point path)
    grid: int  # points in the full grid


# points (N, 2) in input pixels -> float32 low-res logits (N, K, h, w) over the unpadded part of
# the 256 grid and SAM's IoU estimates (N, K): K masks a point (3 from SAM's batched decoder, 1
# best-of-3 through `decode`)
PointDecoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def grid_points(points_per_side: int, input_size: tuple[int, int]) -> np.ndarray:
    """Cell centres of an n x n grid over the image, in input pixels (x, y), row by row."""
    h, w = input_size
    steps = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(steps * w, steps * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def search_passes(points_per_side: int, search: str) -> list[np.ndarray]:
    """Indices into `grid_points`, pass by pass. "coarse": the lattice of every s-th point (s the
    largest power of two leaving >= COARSEST_SIDE points a side), then every s/2-th not yet taken,
    ..., then the rest; the lattices nest, so the passes are a partition of the grid."""
    n = points_per_side
    if search == "grid":
        return [np.arange(n * n)]
    rows, cols = np.divmod(np.arange(n * n), n)
    stride = 1
    while n // (stride * 2) >= COARSEST_SIDE:
        stride *= 2
    offset = stride // 2  # centres the first lattice; every finer lattice (offset 0) contains it
    taken = np.zeros(n * n, dtype=bool)
    passes = []
    while stride >= 1:
        on = (rows % stride == offset % stride) & (cols % stride == offset % stride) & ~taken
        passes.append(np.flatnonzero(on))
        taken |= on
        stride //= 2
    return passes


def stability(logits: np.ndarray, offset: float) -> np.ndarray:
    """IoU of the mask thresholded at +offset and at -offset: high when the edge is sharp.
    (numpy: per-point bookkeeping is a few small arrays, where torch's thread pool costs more than
    the work on a busy CPU)"""
    high = (logits > offset).reshape(len(logits), -1).sum(1)
    low = (logits > -offset).reshape(len(logits), -1).sum(1)
    return np.where(low > 0, high / np.maximum(low, 1), 0.0)


def segment_everything(model: Segmenter, features: np.ndarray, input_size: tuple[int, int],
                       config: AutomaticConfig = AutomaticConfig()) -> list[Found]:
    return search_everything(model, features, input_size, config).objects


def search_everything(model: Segmenter, features: np.ndarray, input_size: tuple[int, int],
                      config: AutomaticConfig = AutomaticConfig()) -> Search:
    """`segment_everything` with its cost: how many grid points were decoded, in how many calls."""
    decoder, batch = point_decoder(model, features, _crop(input_size), config.points_per_batch, input_size)
    return search(decoder, batch, input_size, config)


def point_decoder(model: Segmenter, features: np.ndarray, crop: tuple[int, int], points_per_batch: int,
                  input_size: tuple[int, int]) -> tuple[PointDecoder, int]:
    """The model's decoder as a PointDecoder and the points it takes a call. SAM in torch without
    ONNX Runtime (the GPU path): batches of prompts, all three masks each. Otherwise one prompt at
    a time through the model's `decode` (on a CPU, ONNX Runtime: about 60 ms a point, against
    ~140 ms a point for the batched torch decoder), so the search can skip after every point."""
    if getattr(model, "onnx", None) is None and hasattr(model, "decode_points"):  # (stand-ins decode one by one)
        return _torch_decoder(model, features, crop, input_size), points_per_batch
    return _decode_one_by_one(model, features, crop, input_size), 1


def search(decoder: PointDecoder, batch: int, input_size: tuple[int, int], config: AutomaticConfig) -> Search:
    crop = _crop(input_size)
    points = grid_points(config.points_per_side, input_size)
    cells = np.minimum((points * LOW_RES / max(input_size)).astype(int), [crop[1] - 1, crop[0] - 1])  # (x, y)
    covered = np.zeros(crop, dtype=bool)
    skip = config.search != "grid"
    kept_logits, kept_scores = [], []
    prompts = calls = 0
    for indices in search_passes(config.points_per_side, config.search):
        pending = list(indices)
        while pending:
            if skip:
                pending = [i for i in pending if not covered[cells[i, 1], cells[i, 0]]]
                if not pending:
                    break
            chosen, pending = pending[:batch], pending[batch:]
            logits, scores = decoder(points[chosen])
            prompts += len(chosen)
            calls += 1
            n, k = scores.shape
            flat, flat_scores = logits.reshape(n * k, *logits.shape[2:]), scores.reshape(-1)
            masks = flat > 0
            keep = (flat_scores >= config.pred_iou_thresh) \
                & (stability(flat, config.stability_offset) >= config.stability_thresh) \
                & masks.reshape(n * k, -1).any(1)
            kept_logits.append(flat[keep])
            kept_scores.append(flat_scores[keep])
            if skip:
                _cover(covered, masks.reshape(n, k, *masks.shape[1:]), keep.reshape(n, k))
    objects = _objects(np.concatenate(kept_logits) if kept_logits else np.zeros((0, *crop), np.float32),
                       np.concatenate(kept_scores) if kept_scores else np.zeros(0, np.float32), input_size, config)
    return Search(objects, prompts, calls, config.points_per_side ** 2)


def _cover(covered: np.ndarray, masks: np.ndarray, accepted: np.ndarray) -> None:
    """Mark, for each decoded point, its smallest accepted mask shrunk by one cell."""
    kernel = np.ones((3, 3), np.uint8)
    for point_masks, point_accepted in zip(masks, accepted):
        if not point_accepted.any():
            continue
        choices = np.flatnonzero(point_accepted)
        smallest = choices[np.argmin(point_masks[choices].reshape(len(choices), -1).sum(1))]
        mask = point_masks[smallest].astype(np.uint8)
        covered |= cv2.erode(mask, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1).astype(bool)


def _objects(logits: np.ndarray, scores: np.ndarray, input_size: tuple[int, int],
             config: AutomaticConfig) -> list[Found]:
    """NMS over every accepted candidate, then the minimum area at input resolution and the cap."""
    if len(logits) == 0:
        return []
    masks = torch.from_numpy(logits > 0)
    with torch.inference_mode():
        keep = nms(_boxes(masks).float(), torch.from_numpy(scores).float(), config.nms_iou)
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


def _crop(input_size: tuple[int, int]) -> tuple[int, int]:
    """The unpadded part of the 256 grid; the padded input square's side is the input's long side
    (1024 for SAM, 512 for EfficientViT-SAM L)."""
    h, w = input_size
    side = max(h, w)
    return (h * LOW_RES + side - 1) // side, (w * LOW_RES + side - 1) // side


def _decode_one_by_one(model: Segmenter, features: np.ndarray, crop, input_size) -> PointDecoder:
    ones = np.ones(1, np.int64)

    def decode(points: np.ndarray):
        logits, scores = [], []
        for point in points:
            low, score = model.decode(features, ModelPrompt(point[None].astype(np.float32), ones, None), input_size)
            logits.append(low[: crop[0], : crop[1]])
            scores.append(score)
        return np.asarray(logits, dtype=np.float32)[:, None], np.asarray(scores, dtype=np.float32)[:, None]

    return decode


def _torch_decoder(model: Segmenter, features: np.ndarray, crop, input_size) -> PointDecoder:
    """Batches of prompts, all three masks each (the GPU path; every family's decode_points)."""

    @torch.inference_mode()
    def decode(points: np.ndarray):
        low, iou = model.decode_points(features, points, input_size)  # (N * 3, 256, 256), (N * 3,)
        low = low.reshape(len(points), -1, *low.shape[1:])[:, :, : crop[0], : crop[1]]
        return low.float().cpu().numpy(), iou.reshape(len(points), -1).float().cpu().numpy()

    return decode


def _upscale(low_res_crop: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Cropped low-res logits -> logits at input size, placed the way the padded 256 grid maps to the input square."""
    padded = np.full((LOW_RES, LOW_RES), -20.0, dtype=np.float32)
    padded[: low_res_crop.shape[0], : low_res_crop.shape[1]] = low_res_crop
    return logits_at_input(padded, input_size)


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
