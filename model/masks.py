"""Mask post-processing: logits -> binary masks at input and full resolution, mask -> polygons."""

from __future__ import annotations

import cv2
import numpy as np



def logits_at_input(low_res: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Upscale the decoder's 256x256 logits to the padded input square and crop the padding off.
    The square's side is the input's long side (1024 for SAM, 512 for EfficientViT-SAM L).

    cv2's linear resize uses half-pixel centres like torch's bilinear with align_corners=False,
    so this is SamPredictor's first step at a fraction of its cost.
    """
    h, w = input_size
    side = max(h, w)
    up = cv2.resize(low_res, (side, side), interpolation=cv2.INTER_LINEAR)
    return up[:h, :w]


def mask_at_input(logits_input: np.ndarray) -> np.ndarray:
    return logits_input > 0


def mask_at_original(logits_input: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Full-resolution mask: resize logits (not the thresholded mask) so edges stay smooth."""
    height, width = original_size
    if logits_input.shape == (height, width):
        return logits_input > 0
    full = cv2.resize(logits_input, (width, height), interpolation=cv2.INTER_LINEAR)
    return full > 0


TRACE_SIDE = 1024  # polygons are traced on a mask at least this long (or the image's own size if smaller)


def logits_for_tracing(logits_input: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """The input-frame logits, upsampled for tracing when the model's input is smaller than
    TRACE_SIDE: EfficientViT-SAM L sees 512 px, so its mask has 2.5 px steps on a 1280 px photo;
    tracing at 1024 halves them for ~1 ms (SAM's 1024 input is traced as it is)."""
    in_h, in_w = logits_input.shape
    side = min(TRACE_SIDE, max(original_size))
    if max(in_h, in_w) >= side:
        return logits_input
    scale = side / max(in_h, in_w)
    size = (max(int(round(in_w * scale)), 1), max(int(round(in_h * scale)), 1))
    return cv2.resize(logits_input, size, interpolation=cv2.INTER_LINEAR)


def polygons(mask: np.ndarray, tolerance: float, min_area: float, max_vertices: int = 0, max_parts: int = 0,
             keep_largest: bool = False) -> list[np.ndarray]:
    """Outer contours of the connected parts of `mask` with area >= min_area (pixels of `mask`),
    largest first.

    Returns (N, 2) float arrays of pixel-centre coordinates, simplified by Douglas-Peucker with
    `tolerance` pixels. Holes are filled: Label Studio polygons have no holes. Bounds for what the
    labeling page can draw (0: none): `max_parts` keeps that many of the largest parts;
    `max_vertices` is a budget for all polygons together: the tolerance is raised step by step
    until they fit (a smooth outline barely changes, a ragged one loses its jags first), and only
    when even an outline of a few vertices per part does not fit are the smallest parts dropped.
    `keep_largest`: the largest part gets a polygon even below `min_area` (a click on a small
    defect answers with that defect, not with nothing).
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # the contour runs through boundary pixel centres: add half a pixel per boundary step back
    parts = sorted(((cv2.contourArea(c) + len(c) / 2 + 1, c) for c in contours), key=lambda p: -p[0])
    parts = [c for i, (area, c) in enumerate(parts) if area >= min_area or (keep_largest and i == 0)]
    if max_parts > 0:
        parts = parts[:max_parts]
    out = _simplified(parts, tolerance, [None] * len(parts))
    if max_vertices > 0:
        step = max(tolerance, 0.5)
        limit = max(mask.shape) * 2.0  # beyond this every part is already its fewest vertices
        while sum(len(p) for p in out if p is not None) > max_vertices and step < limit:
            step *= 1.25  # a little at a time: the outline is simplified no more than the budget needs
            out = _simplified(parts, step, out)
        kept = [p for p in out if p is not None]
        total = sum(len(p) for p in kept)
        while len(kept) > 1 and total > max_vertices:  # too many parts even at their fewest vertices
            total -= len(kept.pop())
        return kept
    return [p for p in out if p is not None]


def _simplified(parts: list[np.ndarray], tolerance: float, previous: list) -> list:
    """Each contour simplified with `tolerance`; one that would fall below 3 vertices keeps its
    previous polygon (None: it never had 3, and gets no polygon)."""
    out = []
    for contour, before in zip(parts, previous):
        simple = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
        out.append(simple[:, 0, :].astype(np.float64) if len(simple) >= 3 else before)
    return out
