"""Several windows' masks -> one full-resolution mask: each pixel is taken from the window it is
most central in.

SAM is least sure near the borders of what it sees (an object cut by the border looks like a
different object), so where windows overlap, the pixel goes to the window in which it lies
farthest from an edge (its margin: the distance to the window's nearest edge, an edge on the
image border not counting, since nothing lies beyond it). Margins are compared nearest edge
first, then the other axis's edge: windows in one column of the grid share their left and right
edges, and the one whose top and bottom are farther must win. On the half-overlapping grid of
model.windows this gives each window exactly its core; for any set of windows it is a partition of
their union, so no pixel is decided twice and no seam is averaged. Ties go to the earlier window.
"""

from __future__ import annotations

import numpy as np

from model.paste import paste
from model.windows import Window


def axis_margins(window: Window, rect: tuple[int, int, int, int], image_size: tuple[int, int]):
    """Each pixel centre's distance to the window's nearer left/right edge (per column of `rect`) and
    to its nearer top/bottom edge (per row)."""
    height, width = image_size
    x0, y0, x1, y1 = rect

    def axis(start, stop, lo, hi, length):
        centres = np.arange(start, stop, dtype=np.float64) + 0.5
        before = centres - lo if lo > 0 else np.full(len(centres), np.inf)
        after = hi - centres if hi < length else np.full(len(centres), np.inf)
        return np.minimum(before, after)

    return axis(x0, x1, window.x0, window.x1, width), axis(y0, y1, window.y0, window.y1, height)


def margins(window: Window, rect: tuple[int, int, int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Each pixel's distance (from its centre) to the window's nearest edge, over `rect`."""
    mx, my = axis_margins(window, rect, image_size)
    return np.minimum.outer(my, mx)


def _near_far(window: Window, rect, image_size) -> tuple[np.ndarray, np.ndarray]:
    mx, my = axis_margins(window, rect, image_size)
    return np.minimum.outer(my, mx), np.maximum.outer(my, mx)


def ownership(windows: list[Window], image_size: tuple[int, int]) -> list[np.ndarray]:
    """For each window, which pixels of its rectangle it decides (the parts partition the union)."""
    owned = []
    for i, window in enumerate(windows):
        near, far = _near_far(window, window.rect, image_size)
        own = np.ones(near.shape, dtype=bool)
        for j, other in enumerate(windows):
            if j == i:
                continue
            inter = window.intersection(other)
            if inter is None:
                continue
            x0, y0, x1, y1 = inter
            sub = (slice(y0 - window.y0, y1 - window.y0), slice(x0 - window.x0, x1 - window.x0))
            their_near, their_far = _near_far(other, inter, image_size)
            my_near, my_far = near[sub], far[sub]
            better = (their_near > my_near) | ((their_near == my_near) & (their_far > my_far))
            tie = (their_near == my_near) & (their_far == my_far)
            own[sub] &= ~(better | (tie & (j < i)))
        owned.append(own)
    return owned


def merge(pieces: list[tuple[Window, np.ndarray]], image_size: tuple[int, int],
          base: np.ndarray | None = None) -> np.ndarray:
    """The image-sized mask: `base` (or empty) outside the windows, each window's own pixels inside."""
    full = np.zeros(image_size, dtype=bool) if base is None else base.copy()
    windows = [w for w, _ in pieces]
    for (window, mask), own in zip(pieces, ownership(windows, image_size)):
        paste(full, window, mask, own)
    return full
