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
    mask: np.ndarray  # bool over the window's rectangle, full resolution
    score: float


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
    x0, y0, x1, y1 = rect
    w = obj.window
    return obj.mask[y0 - w.y0:y1 - w.y0, x0 - w.x0:x1 - w.x0]


def same_object(a: TileObject, b: TileObject, min_overlap: float = 0.5) -> bool:
    """Two tiles' objects are one if, inside the tiles' overlap, they cover each other by at least
    `min_overlap` of the smaller one."""
    rect = a.window.intersection(b.window)
    if rect is None:
        return False
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
            keep = owned[index[obj.window]].copy()
            # where a neighbour owns the pixels but never saw this object, this tile's view stands
            for other in windows:
                if other == obj.window or other in seen_by[i]:
                    continue
                rect = obj.window.intersection(other)
                if rect is None:
                    continue
                x0, y0, x1, y1 = rect
                w = obj.window
                theirs = owned[index[other]][y0 - other.y0:y1 - other.y0, x0 - other.x0:x1 - other.x0]
                keep[y0 - w.y0:y1 - w.y0, x0 - w.x0:x1 - w.x0] |= theirs
            pieces.append((obj.window, obj.mask & keep))
        x0 = min(w.x0 for w, _ in pieces)
        y0 = min(w.y0 for w, _ in pieces)
        x1 = max(w.x1 for w, _ in pieces)
        y1 = max(w.y1 for w, _ in pieces)
        patch = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for w, m in pieces:
            patch[w.y0 - y0:w.y1 - y0, w.x0 - x0:w.x1 - x0] |= m
        rows, cols = np.flatnonzero(patch.any(1)), np.flatnonzero(patch.any(0))
        if len(rows) == 0:
            continue
        patch = patch[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        score = float(np.mean([objects[i].score for i in members]))
        found = MergedObject(x0 + int(cols[0]), y0 + int(rows[0]), patch, score)
        if found.area >= min_area:
            merged.append(found)
    return sorted(merged, key=lambda o: (-o.area, o.y0, o.x0))
