"""Paste-back: a window's low-res logits -> its mask at full resolution, in one bilinear step.

The decoder answers on a low-res grid (256x256) over the padded encoder-input square of the
window. Each full-resolution pixel of the window samples that grid at its own centre (bilinear,
cell centres at the cells' middles, borders replicated: the same convention as cv2's and torch's
linear resize with align_corners=False), and the mask is where the logit is above 0. Only the
window's rectangle (or a part of it) is computed: at most side x side floats, never the 20 MP
image in floats.
"""

from __future__ import annotations

import cv2
import numpy as np

from model.windows import Window


def _axis_weights(start: int, stop: int, origin: int, scale: float, cell: float, cells: int):
    """Lower grid index, upper grid index and weight of the upper one, for pixels start..stop-1."""
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    grid = (centres - origin) * scale / cell - 0.5  # continuous index, cell centres at integers
    low = np.floor(grid)
    frac = (grid - low).astype(np.float32)
    low = low.astype(np.int64)
    return np.clip(low, 0, cells - 1), np.clip(low + 1, 0, cells - 1), frac


def window_logits(low_res: np.ndarray, window: Window, rect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Logits at the full-resolution pixels of `rect` (x0, y0, x1, y1; default the whole window)."""
    rows, cols = low_res.shape
    x0, y0, x1, y1 = rect or window.rect
    sx, sy = window.scale
    cell = window.input_side / cols  # encoder-input pixels per low-res cell
    xl, xh, fx = _axis_weights(x0, x1, window.x0, sx, cell, cols)
    yl, yh, fy = _axis_weights(y0, y1, window.y0, sy, cell, rows)
    low = np.asarray(low_res, dtype=np.float32)
    # rows first, then columns: two gathers of (h x cols) and (h x w), no dense interpolation matrix
    by_rows = low[yl] * (1 - fy)[:, None] + low[yh] * fy[:, None]
    return by_rows[:, xl] * (1 - fx) + by_rows[:, xh] * fx


def window_mask(low_res: np.ndarray, window: Window, rect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The window's mask at full resolution over `rect` (default the whole window)."""
    return window_logits(low_res, window, rect) > 0


def input_mask_at_original(mask_input: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """A mask at encoder-input size -> full resolution by nearest neighbour (pixel centres): 20 MB of bool, no floats.
    Used away from edges (inside and outside an object), where every pixel of a cell agrees."""
    height, width = original_size
    if mask_input.shape == (height, width):
        return mask_input.astype(bool)
    return cv2.resize(mask_input.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)


def paste(full: np.ndarray, window: Window, mask: np.ndarray, where: np.ndarray | None = None) -> None:
    """Write a window's full-resolution mask into the image-sized mask `full` (only `where`, if given)."""
    region = full[window.y0:window.y1, window.x0:window.x1]
    if where is None:
        region[...] = mask
    else:
        region[where] = mask[where]
