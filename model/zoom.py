"""The zoom path: which windows answer a prompt, and how their answers become one full-resolution mask.

- What the annotator points at decides: a box gives its extent; clicks give theirs through the first
  answer on the whole-image embedding (the part of it holding a positive click), or, when that
  answer has nothing there (a 2 px crack is invisible at 21 px per cell), the clicks themselves.
- Small extent (at most `threshold` of the image's long side, and held by a window no larger than
  the encoder's native side): the most zoomed grid window that holds it (model.windows), up to
  `max_zoom` times native. If the mask there runs into an edge of the window that is not the
  image's border, the structure goes on: the grid window beyond that edge is decoded too, seeded
  with a point of the mask inside it, and so on (at most `max_windows`): a crack across the screen
  becomes one region made of many windows.
- Large extent: the whole-image answer, with its edges decoded again in the native-resolution grid
  windows its boundary crosses (`edges`), so a large object's outline is pixel-accurate while its
  inside and outside come from the whole-image answer (nearest-neighbour, no float mask at full
  resolution). Which of those windows may be used is the caller's choice (`edge_window_ok`: for
  instance only those already embedded, when encodes are expensive).

Embedding and decoding are the caller's (`embed(window)`, `decode(embedding, ModelPrompt)`), so
the same decisions run against the real model with a cache, or against a stand-in in a benchmark.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import numpy as np

from model.paste import input_mask_at_original, window_mask
from model.prompts import ModelPrompt, Prompt
from model.window_merge import margins, merge
from model.windows import Window, core_windows, levels, window_for_box, with_context

PATH_WHOLE, PATH_ZOOM, PATH_EDGES = "whole", "zoom", "edges"


@dataclasses.dataclass(frozen=True)
class ZoomConfig:
    threshold: float = 0.25  # largest extent zoomed, as a fraction of the image's long side
    max_zoom: int = 4  # windows at most this many times finer than native (input_side / side)
    max_windows: int = 16  # windows one answer may decode (tracing and edges)
    edges: bool = True  # decode a large object's edges in native windows
    context: float = 0.25  # a window holds the extent grown by this fraction of its larger side


@dataclasses.dataclass(frozen=True)
class PixelPrompt:
    """A prompt in full-resolution pixels (continuous: pixel (i, j) spans [j, j+1) x [i, i+1))."""

    points: np.ndarray  # (N, 2) float64 x, y
    labels: np.ndarray  # (N,) int64, 1 positive
    box: np.ndarray | None  # (4,) x0, y0, x1, y1

    @classmethod
    def from_prompt(cls, prompt: Prompt, image_size: tuple[int, int]) -> "PixelPrompt":
        height, width = image_size
        scale = np.array([width, height], dtype=np.float64)
        points = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2) * scale
        box = None if prompt.box is None else np.asarray(prompt.box, dtype=np.float64) * np.tile(scale, 2)
        return cls(points, np.asarray(prompt.labels, dtype=np.int64).reshape(-1), box)

    @property
    def positives(self) -> np.ndarray:
        return self.points[self.labels == 1]

    def in_window(self, window: Window, seeds: np.ndarray | None = None) -> ModelPrompt | None:
        """The prompt as the window's encoder sees it: its points inside the window, the box clipped
        to it, and extra positive `seeds`; None when nothing of it falls inside."""
        inside = window.contains(self.points)
        points, labels = self.points[inside], self.labels[inside]
        if seeds is not None and len(seeds):
            points = np.concatenate([points, np.asarray(seeds, dtype=np.float64).reshape(-1, 2)])
            labels = np.concatenate([labels, np.ones(len(seeds), dtype=np.int64)])
        box = None if self.box is None else window.box_to_frame(self.box)
        if not (labels == 1).any() and box is None:
            return None
        frame_points = window.to_frame(points).astype(np.float32) if len(points) else None
        return ModelPrompt(frame_points, labels.astype(np.int64) if len(points) else None,
                           None if box is None else box.astype(np.float32))


@dataclasses.dataclass
class ZoomAnswer:
    mask: np.ndarray | None  # full resolution, bool; None on the whole-image path (the caller's own output path)
    score: float
    path: str  # PATH_WHOLE, PATH_ZOOM or PATH_EDGES
    windows: list[Window]  # windows decoded (the whole image not counted)
    whole_logits: np.ndarray | None = None  # the whole-image answer (low-res), when it was decoded
    encoded: int = 0  # windows embedded for this answer (the caller counts: only it knows its cache)


Embed = Callable[[Window], object]
Decode = Callable[[object, ModelPrompt], tuple[np.ndarray, float]]


def frame_mask(low_res: np.ndarray, window: Window) -> np.ndarray:
    """The window's mask at its encoder-input size (for the whole image: 1024 on the long side)."""
    in_h, in_w = window.input_size
    frame = Window(0, 0, in_w, in_h, window.input_side, window.input_side)  # one input pixel per pixel
    return window_mask(low_res, frame)


def _extent(points: np.ndarray) -> tuple[float, float, float, float]:
    return float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max())


def _union(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def clicked_extent(whole_input_mask: np.ndarray, whole: Window, prompt: PixelPrompt):
    """Full-resolution extent of the whole-image answer's parts that hold a positive click (None if none do)."""
    if not whole_input_mask.any() or not len(prompt.positives):
        return None
    count, labels = cv2.connectedComponents(whole_input_mask.astype(np.uint8), connectivity=8)
    frame = whole.to_frame(prompt.positives)
    in_h, in_w = whole_input_mask.shape
    cols = np.clip(frame[:, 0].astype(int), 0, in_w - 1)
    rows = np.clip(frame[:, 1].astype(int), 0, in_h - 1)
    hit = {int(v) for v in labels[rows, cols]} - {0}
    if not hit:
        return None
    ys, xs = np.nonzero(np.isin(labels, list(hit)))
    corners = whole.from_frame(np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1]], dtype=np.float64))
    return tuple(corners.reshape(4).tolist())


def is_small(extent, image_size: tuple[int, int], config: ZoomConfig) -> bool:
    x0, y0, x1, y1 = extent
    return max(x1 - x0, y1 - y0) <= config.threshold * max(image_size)


def first_window(prompt: PixelPrompt, image_size: tuple[int, int], input_side: int, config: ZoomConfig,
                 whole_input_mask: np.ndarray | None = None) -> Window | None:
    """The window a prompt is answered on, or None for the whole-image path.

    `whole_input_mask` (the whole-image answer at encoder-input size) is needed for clicks without a box."""
    extent = None if prompt.box is None else tuple(float(v) for v in prompt.box)
    if len(prompt.positives):
        extent = _union(extent, _extent(prompt.positives))
        if prompt.box is None and whole_input_mask is not None:
            extent = _union(extent, clicked_extent(whole_input_mask, Window.whole(image_size, input_side), prompt))
    if extent is None or not is_small(extent, image_size, config):
        return None
    # a window must see at least twice as fine as the whole image, or it is not worth an encode
    largest = min(input_side, max(image_size) // 2)
    return window_for_box(extent, image_size, input_side, config.max_zoom, largest, config.context)


def _box_in_frame(prompt: PixelPrompt, window: Window) -> tuple[int, int, int, int] | None:
    """The prompt's box clipped to the window, in its frame (input pixels); None without a box or outside."""
    if prompt.box is None:
        return None
    framed = window.box_to_frame(prompt.box)
    if framed is None:
        return None
    x0, y0, x1, y1 = framed
    return int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))


def answered_inside(whole_input_mask: np.ndarray, whole: Window, prompt: PixelPrompt) -> bool:
    """Whether the whole-image answer holds anything where the prompt points: inside its box, or the
    part holding a positive click."""
    box = _box_in_frame(prompt, whole)
    if box is not None:
        x0, y0, x1, y1 = box
        return bool(whole_input_mask[max(y0, 0):y1, max(x0, 0):x1].any())
    return clicked_extent(whole_input_mask, whole, prompt) is not None


def most_confident(low_res: np.ndarray, window: Window, prompt: PixelPrompt) -> tuple[float, float]:
    """Full-resolution centre of the low-res cell the decoder is most sure of inside the prompt's box
    (clipped to the window; without a box: the first positive click)."""
    box = _box_in_frame(prompt, window)
    if box is None:
        x, y = (prompt.positives if len(prompt.positives) else prompt.points)[0]
        return float(x), float(y)
    cell = window.input_side / low_res.shape[1]
    x0, y0, x1, y1 = box
    c0, r0 = max(int(x0 // cell), 0), max(int(y0 // cell), 0)
    c1, r1 = max(int(np.ceil(x1 / cell)), c0 + 1), max(int(np.ceil(y1 / cell)), r0 + 1)
    part = low_res[r0:r1, c0:c1]
    r, c = np.unravel_index(int(np.argmax(part)), part.shape)
    x, y = window.from_frame(np.array([(c0 + c + 0.5) * cell, (r0 + r + 0.5) * cell]))
    bx0, by0, bx1, by1 = prompt.box
    return float(np.clip(x, bx0, bx1 - 1e-6)), float(np.clip(y, by0, by1 - 1e-6))


def width_and_core(mask: np.ndarray) -> tuple[float, tuple[float, float]]:
    """The widest part of a full-resolution mask (twice its largest inscribed radius, pixels) and
    that part's centre (continuous coordinates)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    part = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    dist = cv2.distanceTransform(np.pad(part.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return 2.0 * float(dist[y, x]), (float(cols[0] + x + 0.5), float(rows[0] + y + 0.5))


def _deepest(mask: np.ndarray) -> tuple[int, int]:
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def continuations(window: Window, mask: np.ndarray, image_size: tuple[int, int]) -> list[tuple[Window, np.ndarray]]:
    """Grid windows (same side) the mask runs on into across an edge of `window` that is not the
    image border, each with a seed point: the mask's deepest pixel inside that window."""
    band = max(2, window.side // 128)  # two answer cells: the mask runs into the edge, not just near it
    touching = mask & (margins(window, window.rect, image_size) < band)
    if not touching.any():
        return []
    ys, xs = np.nonzero(touching)
    coords = np.stack([xs + window.x0, ys + window.y0], axis=1)
    out = []
    for other in core_windows(coords, window.side, image_size, window.input_side):
        if other == window:
            continue
        x0, y0, x1, y1 = window.intersection(other)
        part = mask[y0 - window.y0:y1 - window.y0, x0 - window.x0:x1 - window.x0]
        if not part.any():
            continue
        x, y = _deepest(part)
        out.append((other, np.array([[x0 + x + 0.5, y0 + y + 0.5]])))
    return out


def _inside(window: Window, rect) -> np.ndarray:
    """Which pixels of the window lie inside the full-resolution rectangle (x0, y0, x1, y1)."""
    xs = np.arange(window.x0, window.x1) + 0.5
    ys = np.arange(window.y0, window.y1) + 0.5
    return np.outer((ys >= rect[1]) & (ys < rect[3]), (xs >= rect[0]) & (xs < rect[2]))


def trace(prompt: PixelPrompt, start: Window, image_size: tuple[int, int], embed: Embed, decode: Decode,
          max_windows: int, context: float = 0.25, seeds: np.ndarray | None = None):
    """Decode `start` (with extra positive `seeds`), then the windows the mask runs on into, breadth
    first. Returns each window's mask, the first window's score and its low-res logits. With a box,
    masks end at the box grown by `context` (an annotator's box is a little tight at times)."""
    limit = None if prompt.box is None else with_context(prompt.box, image_size, context)
    queue: list[tuple[Window, np.ndarray | None]] = [(start, seeds)]
    seen = {start}
    pieces, score, first_low = [], None, None
    while queue and len(pieces) < max_windows:
        window, seeds = queue.pop(0)
        window_prompt = prompt.in_window(window, seeds)
        if window_prompt is None:
            continue
        low_res, window_score = decode(embed(window), window_prompt)
        mask = window_mask(low_res, window)
        if limit is not None:
            mask &= _inside(window, limit)
        pieces.append((window, mask))
        if score is None:
            score, first_low = window_score, low_res
        for other, seed in continuations(window, mask, image_size):
            if limit is not None and other.box_to_frame(limit) is None:
                continue  # the annotator's box says the object ends there
            if other not in seen:
                seen.add(other)
                queue.append((other, seed))
    return pieces, 0.0 if score is None else float(score), first_low


def finer(prompt: PixelPrompt, start: Window, pieces, first_low, image_size: tuple[int, int], config: ZoomConfig):
    """Where to look again at the finest zoom, or None: when the window's answer is empty, or thinner
    than three of its cells (a 3 px scratch inside a box that fits a native window is half-lost on its
    4 px cells), the structure is followed from its widest point (or, empty, the most confident cell)."""
    finest = levels(image_size, start.input_side, config.max_zoom)
    if not finest or start.side <= finest[0] or first_low is None:
        return None
    merged = merge(pieces, image_size) if pieces else None
    if merged is None or not merged.any():
        return most_confident(first_low, start, prompt)
    width, core = width_and_core(merged)
    if width < 3 * start.cell_size(first_low.shape[1]):
        return core
    return None


def edge_windows(whole_input_mask: np.ndarray, whole: Window, side: int) -> list[Window]:
    """Grid windows of `side` whose core the whole-image answer's boundary crosses, most boundary first."""
    m = whole_input_mask.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    boundary = (cv2.dilate(m, kernel) != cv2.erode(m, kernel))
    ys, xs = np.nonzero(boundary)
    if len(xs) == 0:
        return []
    full = whole.from_frame(np.stack([xs + 0.5, ys + 0.5], axis=1))
    coords = np.floor(full).astype(np.int64)
    height, width = whole.height, whole.width
    coords[:, 0] = np.clip(coords[:, 0], 0, width - 1)
    coords[:, 1] = np.clip(coords[:, 1], 0, height - 1)
    windows = core_windows(coords, side, (height, width), whole.input_side)

    def crossing(w: Window) -> int:
        return int(np.count_nonzero((coords[:, 0] >= w.x0) & (coords[:, 0] < w.x1)
                                    & (coords[:, 1] >= w.y0) & (coords[:, 1] < w.y1)))

    return sorted(windows, key=lambda w: (-crossing(w), w))


def refine_edges(prompt: PixelPrompt, coarse: np.ndarray, windows: list[Window], embed: Embed,
                 decode: Decode) -> list[tuple[Window, np.ndarray]]:
    """Decode each edge window, prompted with the user's prompt where it falls inside and the
    coarse answer's deepest pixel inside the window (the object's side of the edge)."""
    pieces = []
    for window in windows:
        inside = window.crop(coarse)
        seeds = None
        if inside.any():
            x, y = _deepest(inside)
            seeds = np.array([[window.x0 + x + 0.5, window.y0 + y + 0.5]])
        window_prompt = prompt.in_window(window, seeds)
        if window_prompt is None:
            continue
        low_res, _ = decode(embed(window), window_prompt)
        pieces.append((window, window_mask(low_res, window)))
    return pieces


def answer(prompt: PixelPrompt, image_size: tuple[int, int], input_side: int, config: ZoomConfig,
           embed: Embed, decode: Decode, whole_answer: Callable[[], tuple[np.ndarray, float]],
           edge_window_ok: Callable[[Window], bool] = lambda w: True) -> ZoomAnswer:
    """The full-resolution mask for a prompt, through windows where they see finer than the whole image;
    on the whole-image path the mask is left to the caller (`whole_logits`).

    `whole_answer()` decodes the prompt on the whole-image embedding (low-res logits, score); it is
    called only when needed (clicks without a box, or a large extent)."""
    whole = Window.whole(image_size, input_side)
    whole_low = whole_mask = None
    if prompt.box is None:
        whole_low, whole_score = whole_answer()
        whole_mask = frame_mask(whole_low, whole)
    start = first_window(prompt, image_size, input_side, config, whole_mask)
    if start is None:
        if whole_low is None:
            whole_low, whole_score = whole_answer()
            whole_mask = frame_mask(whole_low, whole)
        if not answered_inside(whole_mask, whole, prompt):
            # the prompt spans much of the image yet the whole-image answer has nothing there: a
            # structure too thin to exist at this scale (a crack inside a large box). Follow it from
            # where the decoder is most sure, at the finest zoom
            x, y = most_confident(whole_low, whole, prompt)
            start = window_for_box((x, y, x, y), image_size, input_side, config.max_zoom,
                                   min(input_side, max(image_size) // 2), config.context)
    if start is not None:
        pieces, score, first_low = trace(prompt, start, image_size, embed, decode, config.max_windows, config.context)
        seed = finer(prompt, start, pieces, first_low, image_size, config)
        if seed is not None:
            fine = window_for_box((*seed, *seed), image_size, input_side, config.max_zoom, start.side // 2, config.context)
            if fine is not None:
                more, fine_score, _ = trace(prompt, fine, image_size, embed, decode,
                                            max(config.max_windows - len(pieces), 1), config.context, np.array([seed]))
                if more and any(m.any() for _, m in more):
                    pieces, score = more, fine_score
        if pieces:
            return ZoomAnswer(merge(pieces, image_size), score, PATH_ZOOM, [w for w, _ in pieces], whole_low)
        if whole_low is None:
            whole_low, whole_score = whole_answer()
            whole_mask = frame_mask(whole_low, whole)
    native = levels(image_size, input_side, 1)
    if config.edges and native and native[-1] * 2 <= max(image_size):
        chosen = [w for w in edge_windows(whole_mask, whole, native[-1]) if edge_window_ok(w)][: config.max_windows]
        if chosen:
            coarse = input_mask_at_original(whole_mask, image_size)
            pieces = refine_edges(prompt, coarse, chosen, embed, decode)
            if pieces:
                return ZoomAnswer(merge(pieces, image_size, coarse), float(whole_score), PATH_EDGES,
                                  [w for w, _ in pieces], whole_low)
    return ZoomAnswer(None, float(whole_score), PATH_WHOLE, [], whole_low)
