"""Tiled drafts of large images: objects found in overlapping tiles -> one mask per object.

A 20 MP photo is covered by the native-resolution grid windows of model.windows (the same windows
clicks zoom into and `warm` can embed, so their embeddings serve both). Each tile is segmented on
its own; then:
- every tile decides only the pixels it owns (model.window_merge: where it is most central), so an
  object is never cut by a tile's own border artefacts;
- objects of neighbouring tiles that agree inside the tiles' overlap (their masks there overlap by
  at least half of the smaller one) are one object, their owned parts joined;
- an object a neighbour did not see keeps its pixels in that neighbour's part too;
- only then is the minimum area applied, so an object cut into small pieces by tile borders is
  judged by its whole size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model.window_merge import ownership
from model.windows import Window


@dataclasses.dataclass
class TileObject:
    window: Window
    mask: np.ndarray  # bool patch at full resolution, inside the window's rectangle
    score: float
    x0: int | None = None  # the patch's place (default: the window's corner, the patch its whole rectangle)
    y0: int | None = None

    def __post_init__(self):
        self.x0 = self.window.x0 if self.x0 is None else self.x0
        self.y0 = self.window.y0 if self.y0 is None else self.y0

    @classmethod
    def cropped(cls, window: Window, mask: np.ndarray, score: float) -> "TileObject | None":
        """An object from a mask over the whole window, kept as its bounding box (tiles hold many objects)."""
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            return None
        patch = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy()
        return cls(window, patch, score, window.x0 + int(cols[0]), window.y0 + int(rows[0]))

    @property
    def rect(self) -> tuple[int, int, int, int]:
        h, w = self.mask.shape
        return self.x0, self.y0, self.x0 + w, self.y0 + h


@dataclasses.dataclass
class MergedObject:
    x0: int
    y0: int
    mask: np.ndarray  # bool patch at (x0, y0)
    score: float  # mean of its parts' scores

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def full(self, image_size: tuple[int, int]) -> np.ndarray:
        out = np.zeros(image_size, dtype=bool)
        h, w = self.mask.shape
        out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.mask
        return out


class _Sets:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _part(obj: TileObject, rect) -> np.ndarray:
    """The object's pixels over `rect` (zero where its patch does not reach)."""
    x0, y0, x1, y1 = rect
    out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    px0, py0, px1, py1 = obj.rect
    ix0, iy0, ix1, iy1 = max(x0, px0), max(y0, py0), min(x1, px1), min(y1, py1)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = obj.mask[iy0 - py0:iy1 - py0, ix0 - px0:ix1 - px0]
    return out


def same_object(a: TileObject, b: TileObject, min_overlap: float = 0.5) -> bool:
    """Two tiles' objects are one if, inside the tiles' overlap, they cover each other by at least
    `min_overlap` of the smaller one."""
    rect = a.window.intersection(b.window)
    if rect is None:
        return False
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.rect, b.rect
    if min(ax1, bx1) <= max(ax0, bx0) or min(ay1, by1) <= max(ay0, by0):
        return False  # their boxes do not even meet
    pa, pb = _part(a, rect), _part(b, rect)
    inter = np.count_nonzero(pa & pb)
    if inter == 0:
        return False
    return inter >= min_overlap * min(np.count_nonzero(pa), np.count_nonzero(pb))


def merge_tiles(objects: list[TileObject], image_size: tuple[int, int], min_area: int = 0) -> list[MergedObject]:
    """One mask per object across tiles, then the minimum area (full-resolution pixels)."""
    windows = sorted({o.window for o in objects})
    index = {w: i for i, w in enumerate(windows)}
    owned = ownership(windows, image_size)
    sets = _Sets(len(objects))
    seen_by: dict[int, set[Window]] = {i: set() for i in range(len(objects))}
    for i, a in enumerate(objects):
        for j in range(i + 1, len(objects)):
            b = objects[j]
            if a.window != b.window and same_object(a, b):
                sets.join(i, j)
                seen_by[i].add(b.window)
                seen_by[j].add(a.window)

    groups: dict[int, list[int]] = {}
    for i in range(len(objects)):
        groups.setdefault(sets.find(i), []).append(i)
    merged = []
    for members in groups.values():
        pieces = []
        for i in members:
            obj = objects[i]
            px0, py0, px1, py1 = obj.rect
            w = obj.window
            keep = owned[index[w]][py0 - w.y0:py1 - w.y0, px0 - w.x0:px1 - w.x0].copy()
            # where a neighbour owns the pixels but never saw this object, this tile's view stands
            for other in windows:
                if other == w or other in seen_by[i]:
                    continue
                x0, y0 = max(px0, other.x0), max(py0, other.y0)
                x1, y1 = min(px1, other.x1), min(py1, other.y1)
                if x1 <= x0 or y1 <= y0:
                    continue
                theirs = owned[index[other]][y0 - other.y0:y1 - other.y0, x0 - other.x0:x1 - other.x0]
                keep[y0 - py0:y1 - py0, x0 - px0:x1 - px0] |= theirs
            pieces.append((obj.rect, obj.mask & keep))
        x0 = min(r[0] for r, _ in pieces)
        y0 = min(r[1] for r, _ in pieces)
        x1 = max(r[2] for r, _ in pieces)
        y1 = max(r[3] for r, _ in pieces)
        patch = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for (rx0, ry0, rx1, ry1), m in pieces:
            patch[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0] |= m
        rows, cols = np.flatnonzero(patch.any(1)), np.flatnonzero(patch.any(0))
        if len(rows) == 0:
            continue
        patch = patch[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        score = float(np.mean([objects[i].score for i in members]))
        found = MergedObject(x0 + int(cols[0]), y0 + int(rows[0]), patch, score)
        if found.area >= min_area:
            merged.append(found)
    return sorted(merged, key=lambda o: (-o.area, o.y0, o.x0))
