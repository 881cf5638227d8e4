"""Synthetic smartphone-screen photos with exact ground truth, for `sam-backend bench fidelity`.

Each screen is textured glass under a gradient with glare and sensor noise, carrying defects of
known shape: thin scratches 1-3 px wide, pits, a branching 2 px crack crossing much of the screen,
blemishes, and one large object (a worn or discoloured patch of phone size). Every defect's ground
truth is a bool patch (its bounding box and the pixels inside it, where the pixel's centre lies
within the shape), so a 20 MP screen never needs one 20 MP mask per defect.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

KINDS = ("scratch", "crack", "pit", "blemish", "large")


@dataclasses.dataclass
class Defect:
    kind: str
    name: str
    x0: int  # the patch's place in the image
    y0: int
    mask: np.ndarray  # bool patch
    width_px: float = 0.0  # stroke width of thin defects
    centreline: np.ndarray | None = None  # (N, 2) points along thin defects, for recall of the line

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The tight bounding box, full-resolution continuous coordinates."""
        ys, xs = np.nonzero(self.mask)
        return (float(self.x0 + xs.min()), float(self.y0 + ys.min()),
                float(self.x0 + xs.max() + 1), float(self.y0 + ys.max() + 1))

    @property
    def rect(self) -> tuple[int, int, int, int]:
        h, w = self.mask.shape
        return self.x0, self.y0, self.x0 + w, self.y0 + h

    def deepest_point(self) -> tuple[float, float]:
        """The interior pixel farthest from the boundary (the standard first click), at its centre."""
        dist = cv2.distanceTransform(np.pad(self.mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        return self.x0 + x + 0.5, self.y0 + y + 0.5


@dataclasses.dataclass
class Screen:
    size: tuple[int, int]  # (height, width)
    defects: list[Defect]
    seed: int

    def render(self) -> np.ndarray:
        return render(self)


def _stroke(points: np.ndarray, width: float, shape_hw: tuple[int, int], x0: int, y0: int) -> np.ndarray:
    """Pixels (of a patch at x0, y0) whose centre lies within width/2 of the polyline."""
    mask = np.zeros(shape_hw, dtype=bool)
    r = width / 2
    for a, b in zip(points[:-1], points[1:]):
        lo = np.floor(np.minimum(a, b) - r - 1).astype(int)
        hi = np.ceil(np.maximum(a, b) + r + 1).astype(int)
        cx0, cy0 = max(lo[0] - x0, 0), max(lo[1] - y0, 0)
        cx1, cy1 = min(hi[0] - x0, shape_hw[1]), min(hi[1] - y0, shape_hw[0])
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        px = np.arange(cx0, cx1) + x0 + 0.5
        py = np.arange(cy0, cy1) + y0 + 0.5
        gx, gy = np.meshgrid(px, py)
        d = b - a
        t = np.clip(((gx - a[0]) * d[0] + (gy - a[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
        dist = np.hypot(gx - a[0] - t * d[0], gy - a[1] - t * d[1])
        mask[cy0:cy1, cx0:cx1] |= dist <= r
    return mask


def _curve(rng: np.random.Generator, start, end, bend: float, steps: int) -> np.ndarray:
    """A gently bent polyline from start to end (quadratic Bezier), about one point per 20 px."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    normal = np.array([-(end - start)[1], (end - start)[0]])
    control = (start + end) / 2 + normal * bend * rng.uniform(-1, 1)
    t = np.linspace(0, 1, steps)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end


def _jagged(rng: np.random.Generator, start, direction: float, length: float, step: float = 24.0) -> np.ndarray:
    """A crack's path: straight-ish steps with small random turns."""
    points = [np.asarray(start, float)]
    angle = direction
    for _ in range(max(int(length / step), 2)):
        angle += rng.normal(0, 0.12) - 0.15 * (angle - direction)  # wanders, but keeps its course
        points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(points)


def _thin(kind: str, name: str, paths: list[np.ndarray], width: float) -> Defect:
    allpts = np.concatenate(paths)
    r = width / 2 + 2
    x0, y0 = np.floor(allpts.min(0) - r).astype(int)
    x1, y1 = np.ceil(allpts.max(0) + r).astype(int)
    mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for path in paths:
        mask |= _stroke(path, width, mask.shape, x0, y0)
    line = np.concatenate([_densify(p) for p in paths])
    return Defect(kind, name, int(x0), int(y0), mask, width, line)


def _densify(path: np.ndarray) -> np.ndarray:
    out = []
    for a, b in zip(path[:-1], path[1:]):
        n = max(int(np.ceil(np.hypot(*(b - a)))), 1)
        out.append(a + (b - a) * (np.arange(n)[:, None] / n))
    out.append(path[-1:])
    return np.concatenate(out)


def _blob(name: str, kind: str, centre, axes, angle: float, rng: np.random.Generator, wobble: float) -> Defect:
    """An ellipse whose radius wobbles a little with the angle (real patches are not ellipses)."""
    ax, ay = axes
    r = max(ax, ay) * (1 + wobble) + 2
    x0, y0 = int(np.floor(centre[0] - r)), int(np.floor(centre[1] - r))
    size = int(np.ceil(2 * r)) + 1
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xs + x0 + 0.5 - centre[0], ys + y0 + 0.5 - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    theta = np.arctan2(v / ay, u / ax)
    phases = rng.uniform(0, 2 * np.pi, 3)
    radius = 1 + wobble * (0.6 * np.sin(3 * theta + phases[0]) + 0.3 * np.sin(5 * theta + phases[1])
                           + 0.1 * np.sin(9 * theta + phases[2]))
    mask = (u / ax) ** 2 + (v / ay) ** 2 <= radius ** 2
    ys_, xs_ = np.nonzero(mask)
    mask = mask[ys_.min():ys_.max() + 1, xs_.min():xs_.max() + 1]
    return Defect(kind, name, x0 + int(xs_.min()), y0 + int(ys_.min()), mask)


def make_screen(size: tuple[int, int], seed: int) -> Screen:
    """One screen's defects, placed apart from each other and from the borders (scaled to the image)."""
    height, width = size
    rng = np.random.default_rng(seed)
    unit = width / 5472  # the layout is drawn for a 5472 x 3648 photo and scaled
    defects: list[Defect] = []

    def at(fx, fy):
        return np.array([fx * width + rng.uniform(-0.01, 0.01) * width, fy * height + rng.uniform(-0.01, 0.01) * height])

    # the large object: a worn patch of phone size, upper left quarter
    defects.append(_blob("large", "large", at(0.24, 0.3), (1100 * unit, 700 * unit), rng.uniform(-0.3, 0.3), rng, 0.06))
    # a crack from the right border region across much of the screen, with two branches
    crack_len = 0.55 * width
    main = _jagged(rng, at(0.93, 0.62), np.pi + rng.uniform(-0.25, 0.1), crack_len)
    branches = [_jagged(rng, main[len(main) * k // 5], np.pi + s * rng.uniform(0.5, 0.9), 0.11 * width)
                for k, s in ((2, 1), (3, -1))]
    defects.append(_thin("crack", "crack", [main] + branches, 2.0))
    # scratches 1, 2 and 3 px wide, 400-1200 px long
    for i, (w, fx, fy, length) in enumerate(((1.0, 0.55, 0.12, 700), (2.0, 0.72, 0.3, 1100), (3.0, 0.56, 0.9, 850))):
        angle = rng.uniform(-0.5, 0.5)
        start = at(fx, fy)
        end = start + length * unit * np.array([np.cos(angle), np.sin(angle)])
        defects.append(_thin("scratch", f"scratch_{int(w)}px", [_curve(rng, start, end, 0.08, 40)], w))
    # pits: radius 3, 6 and 9 px
    for r, fx, fy in ((3, 0.12, 0.82), (6, 0.3, 0.86), (9, 0.46, 0.72)):
        defects.append(_blob(f"pit_r{r}", "pit", at(fx, fy), (r, r), 0.0, rng, 0.0))
    # blemishes: soft-edged stains about 80 x 50 and 130 x 70 px
    for i, (ax, ay, fx, fy) in enumerate(((40, 25, 0.88, 0.14), (65, 35, 0.08, 0.62))):
        defects.append(_blob(f"blemish_{i}", "blemish", at(fx, fy), (ax * unit ** 0.5, ay * unit ** 0.5),
                             rng.uniform(0, np.pi), rng, 0.08))
    return Screen(size, defects, seed)


def render(screen: Screen) -> np.ndarray:
    """RGB uint8: textured glass, a gradient, glare, noise, and the defects drawn in."""
    height, width = screen.size
    rng = np.random.default_rng(screen.seed + 1000)
    small = rng.normal(0, 1, (height // 64 + 2, width // 64 + 2)).astype(np.float32)
    texture = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    gy, gx = np.mgrid[0:height:8, 0:width:8].astype(np.float32)
    ramp = cv2.resize(40 * gx / width + 25 * gy / height, (width, height), interpolation=cv2.INTER_LINEAR)
    base = 38 + ramp + 6 * texture
    for _ in range(3):  # glare: broad bright spots
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sigma = rng.uniform(0.05, 0.15) * width
        yy, xx = np.ogrid[0:height:8, 0:width:8]
        spot = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))).astype(np.float32)
        base += 90 * cv2.resize(spot, (width, height), interpolation=cv2.INTER_LINEAR)
    tint = {"scratch": 70, "crack": -30, "pit": -25, "blemish": 22, "large": 30}
    for d in screen.defects:
        x0, y0, x1, y1 = d.rect
        base[y0:y1, x0:x1][d.mask] += tint[d.kind]
    noise = rng.normal(0, 4, (height, width)).astype(np.float32)
    grey = np.clip(base + noise, 0, 255)
    rgb = np.stack([grey * 0.97, grey, grey * 1.04], axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8)
