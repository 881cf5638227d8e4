"""Zoom windows: rectangles of the full-resolution image that the encoder sees at its own input size.

SAM looks at an image through a square of `input_side` pixels (1024 for SAM, 512 for
EfficientViT-SAM) and answers on a 256x256 grid over that square: on a 5472 px photo one answer
cell covers ~21x21 pixels, so a 3 px scratch cannot exist in the answer. A window of `side`
full-resolution pixels seen at the same input size answers with cells of side/256 pixels: a
window of 1024 px is "native" (4 px cells), one of 256 px is zoomed 4x (1 px cells).

Windows are snapped to a grid: sides are input_side / 2**k (a power-of-two zoom) or multiples of
it, and along each axis a window of side L starts at a multiple of L/2 (the last one is moved
back to end at the image border). Neighbouring prompts therefore land in the very same window,
and its cached embedding serves them all. With a half-side stride every box no longer than L/2
fits in some window of side L.

Every window has max(width, height) == side: a window is never smaller than its side along the
image's long axis, so its encoder input has the encoder's full long side (what SAM's encode wants).
The whole image is the window of side max(W, H) at (0, 0), so one set of coordinate rules serves
both paths.

Coordinates are continuous full-resolution pixels: pixel (i, j) covers [j, j+1) x [i, i+1), and a
point Label Studio sends at x% lies at x/100 * W, as model.prompts maps it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from model.prompts import preprocess_shape


@dataclasses.dataclass(frozen=True, order=True)
class Window:
    x0: int
    y0: int
    width: int
    height: int
    side: int  # grid level: the full-resolution pixels the encoder's input side spans
    input_side: int  # the encoder's input side (1024 for SAM)

    @classmethod
    def whole(cls, image_size: tuple[int, int], input_side: int) -> "Window":
        height, width = image_size
        return cls(0, 0, width, height, max(width, height), input_side)

    @property
    def x1(self) -> int:
        return self.x0 + self.width

    @property
    def y1(self) -> int:
        return self.y0 + self.height

    @property
    def rect(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the encoder input: the crop resized so its long side is input_side,
        rounded as segment_anything's ResizeLongestSide rounds (the whole image is resized the same way)."""
        return preprocess_shape(self.height, self.width, self.input_side)

    @property
    def scale(self) -> tuple[float, float]:
        """Encoder-input pixels per full-resolution pixel, (x, y)."""
        in_h, in_w = self.input_size
        return in_w / self.width, in_h / self.height

    @property
    def zoom(self) -> float:
        """How much finer than native resolution the encoder sees this window (4: each pixel is 4 input pixels)."""
        return self.input_side / self.side

    def cell_size(self, low_res_side: int = 256) -> float:
        """Full-resolution pixels per cell of the decoder's low-res grid (which covers the padded input square)."""
        return self.input_side / low_res_side / self.scale[0]

    @property
    def key(self) -> str:
        """Names the window in cache keys (the model id names the input side)."""
        return f"{self.x0}-{self.y0}-{self.width}x{self.height}"

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """Full-resolution (x, y) -> the window's encoder-input pixels."""
        sx, sy = self.scale
        points = np.asarray(points, dtype=np.float64)
        return (points - np.array([self.x0, self.y0])) * np.array([sx, sy])

    def from_frame(self, points: np.ndarray) -> np.ndarray:
        """The window's encoder-input pixels -> full-resolution (x, y)."""
        sx, sy = self.scale
        points = np.asarray(points, dtype=np.float64)
        return points / np.array([sx, sy]) + np.array([self.x0, self.y0])

    def box_to_frame(self, box) -> np.ndarray | None:
        """A full-resolution box (x0, y0, x1, y1) clipped to the window, in its frame; None if they do not meet."""
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, y0 = max(x0, self.x0), max(y0, self.y0)
        x1, y1 = min(x1, self.x1), min(y1, self.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        corners = self.to_frame(np.array([[x0, y0], [x1, y1]]))
        return corners.reshape(4)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which of the full-resolution (x, y) points lie inside the window."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return ((points[:, 0] >= self.x0) & (points[:, 0] < self.x1)
                & (points[:, 1] >= self.y0) & (points[:, 1] < self.y1))

    def intersection(self, other: "Window") -> tuple[int, int, int, int] | None:
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The window's pixels of a full-resolution image (a view, no copy)."""
        return image[self.y0:self.y1, self.x0:self.x1]


def axis_positions(length: int, side: int) -> list[int]:
    """Starts of the grid windows of `side` along an axis of `length` pixels: multiples of side/2,
    and one more flush with the far border when the last multiple does not reach it."""
    if length <= side:
        return [0]
    stride = side // 2
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def axis_cores(length: int, side: int) -> list[tuple[int, int]]:
    """The part of the axis each grid window is most central for: the cells around the windows'
    centres, split half way between neighbouring centres (the first and last reach the borders).
    They partition the axis, so on a grid every pixel has exactly one window it belongs to."""
    starts = axis_positions(length, side)
    centres = [s + min(side, length) / 2 for s in starts]
    bounds = [0] + [int(math.floor((a + b) / 2)) for a, b in zip(centres, centres[1:])] + [length]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def grid_window(x0: int, y0: int, side: int, image_size: tuple[int, int], input_side: int) -> Window:
    height, width = image_size
    return Window(x0, y0, min(side, width), min(side, height), side, input_side)


def levels(image_size: tuple[int, int], input_side: int, max_zoom: int, largest: int | None = None) -> list[int]:
    """Window sides from the most zoomed (input_side / max_zoom) up, doubling, at most `largest`
    (default: the native side, input_side) and shorter than the image's long side."""
    long_side = max(image_size)
    top = largest or input_side
    side = max(input_side // max(max_zoom, 1), 16)
    out = []
    while side <= top and side < long_side:  # a window as long as the image is the whole image
        out.append(side)
        side *= 2
    return out


def snap(box, side: int, image_size: tuple[int, int], input_side: int) -> Window | None:
    """The grid window of `side` that contains the box (x0, y0, x1, y1) and is most centred on it; None if none does."""
    height, width = image_size
    chosen = []
    for lo, hi, length in ((box[0], box[2], width), (box[1], box[3], height)):
        fits = [s for s in axis_positions(length, side) if s <= lo and s + min(side, length) >= hi]
        if not fits:
            return None
        middle = (lo + hi) / 2
        chosen.append(min(fits, key=lambda s: (abs(s + min(side, length) / 2 - middle), s)))
    return grid_window(chosen[0], chosen[1], side, image_size, input_side)


def with_context(box, image_size: tuple[int, int], context: float = 0.25, minimum: float = 8.0) -> tuple:
    """The box grown by `context` of its larger side on each side (at least `minimum` pixels), clipped
    to the image: SAM judges an object by what surrounds it too."""
    height, width = image_size
    x0, y0, x1, y1 = (float(v) for v in box)
    grow = max(context * max(x1 - x0, y1 - y0), minimum)
    return max(x0 - grow, 0.0), max(y0 - grow, 0.0), min(x1 + grow, float(width)), min(y1 + grow, float(height))


def window_for_box(box, image_size: tuple[int, int], input_side: int, max_zoom: int,
                   largest: int | None = None, context: float = 0.25) -> Window | None:
    """The most zoomed grid window that holds the box with its context, up to side `largest`
    (default native); None when no window that small holds it."""
    grown = with_context(box, image_size, context)
    for side in levels(image_size, input_side, max_zoom, largest):
        found = snap(grown, side, image_size, input_side)
        if found is not None:
            return found
    return None


def grid_windows(side: int, image_size: tuple[int, int], input_side: int) -> list[Window]:
    """Every grid window of `side`: they cover the image with half-side overlaps (the tiles of
    tiled pre-labelling and of warming windows)."""
    height, width = image_size
    return [grid_window(x, y, side, image_size, input_side)
            for y in axis_positions(height, side) for x in axis_positions(width, side)]


def core_windows(mask_points: np.ndarray, side: int, image_size: tuple[int, int], input_side: int) -> list[Window]:
    """The grid windows of `side` whose core (see axis_cores) holds any of the full-resolution
    pixel coordinates (N, 2 integer x, y), in row-major order."""
    height, width = image_size
    points = np.asarray(mask_points).reshape(-1, 2)
    if len(points) == 0:
        return []
    found = []
    xs_start, ys_start = axis_positions(width, side), axis_positions(height, side)
    x_bounds = np.array([c[1] for c in axis_cores(width, side)])
    y_bounds = np.array([c[1] for c in axis_cores(height, side)])
    col = np.searchsorted(x_bounds, points[:, 0], side="right")
    row = np.searchsorted(y_bounds, points[:, 1], side="right")
    for r, c in sorted(set(zip(row.tolist(), col.tolist()))):
        found.append(grid_window(xs_start[c], ys_start[r], side, image_size, input_side))
    return found
