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


def polygons(mask: np.ndarray, tolerance: float, min_area: float) -> list[np.ndarray]:
    """Outer contours of every connected part with area >= min_area (pixels of `mask`).

    Returns (N, 2) float arrays of pixel-centre coordinates, simplified by Douglas-Peucker with
    `tolerance` pixels. Holes are filled: Label Studio polygons have no holes.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = []
    for contour in contours:
        # the contour runs through boundary pixel centres: add half a pixel per boundary step back
        if cv2.contourArea(contour) + len(contour) / 2 + 1 < min_area:
            continue
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance, True)
        if len(contour) < 3:
            continue
        out.append(contour[:, 0, :].astype(np.float64))
    return out
