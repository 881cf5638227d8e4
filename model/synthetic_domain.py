"""A synthetic domain where the base mask is wrong in a learnable way, for `bench learn` and tests.

No real SAM weights can be used here (random weights segment nothing), so the base is a
controlled stand-in for SAM's output behind the same interface as SAM's decoder
(`base(features, prompt) -> logits` over the encoder input): it bleeds into the object's cast
shadow and misses its thin parts, the way SAM does on product photos and defect close-ups.
Clicks move it the way they move SAM: a positive click outside the mask adds a patch around
it, a negative click cuts one out. The head only ever sees what it sees for real SAM: the
image, the base logits and the prompt.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from model.prompts import ModelPrompt

SHADOW_OFFSET = (14, 20)  # light from the top left


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # RGB uint8
    gt: np.ndarray  # bool: the annotated object, thin parts included
    base_map: np.ndarray  # bool: what the stand-in base segments (objects + shadows, thin parts gone)
    objects: np.ndarray  # bool: every object, thin parts included, no shadows

    @property
    def features(self) -> np.ndarray:
        """What the stand-in base gets in place of SAM's embedding."""
        return np.stack([self.base_map, self.objects])


def _blob(rng: np.random.Generator, shape, centre, radius) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = radius * rng.uniform(0.65, 1.0, 9)
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
    cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask.astype(bool)


def _thin_parts(rng: np.random.Generator, shape, centre, radius) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(2, 4)):
        angle = rng.uniform(0, 2 * np.pi)
        length = radius + rng.uniform(50, 110)
        end = (int(centre[0] + length * np.cos(angle)), int(centre[1] + length * np.sin(angle)))
        cv2.line(mask, (int(centre[0]), int(centre[1])), end, 1, int(rng.integers(5, 8)))
    return mask.astype(bool)


def make_scene(seed: int, size: tuple[int, int] = (768, 1024)) -> Scene:
    """One image (height, width = `size`) with a main object and 0-2 distractors, each with a shadow."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    ground = rng.uniform(150, 215, 3)
    image = ground[None, None] + (xx / w * rng.uniform(-25, 25))[..., None] + rng.normal(0, 6, (h, w, 3))
    shapes, base_map = [], np.zeros((h, w), bool)
    for k in range(1 + rng.integers(0, 3)):
        for _ in range(20):  # place without overlapping earlier objects
            radius = rng.uniform(55, 95) if k == 0 else rng.uniform(35, 60)
            centre = (rng.uniform(radius + 120, w - radius - 120), rng.uniform(radius + 120, h - radius - 120))
            body = _blob(rng, (h, w), centre, radius)
            obj = body | _thin_parts(rng, (h, w), centre, radius)
            if not any((cv2.dilate(o.astype(np.uint8), np.ones((41, 41), np.uint8)) > 0)[obj].any() for o, _ in shapes):
                break
        shadow = np.roll(np.roll(obj, SHADOW_OFFSET[1], axis=0), SHADOW_OFFSET[0], axis=1) & ~obj
        shadow = cv2.GaussianBlur(shadow.astype(np.float32), (0, 0), 2) > 0.3
        shapes.append((obj, shadow))
    for obj, shadow in shapes:
        image[shadow & ~obj] *= rng.uniform(0.5, 0.62)
    for k, (obj, _) in enumerate(shapes):
        colour = rng.uniform(20, 110, 3) if rng.random() < 0.5 else rng.uniform(60, 140, 3) * [1.6, 0.6, 0.6]
        image[obj] = colour + rng.normal(0, 8, (int(obj.sum()), 3))
        blurred = cv2.morphologyEx((obj | shapes[k][1]).astype(np.uint8), cv2.MORPH_OPEN,
                                   cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13)))
        base_map |= blurred.astype(bool)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(image, shapes[0][0], base_map, np.logical_or.reduce([obj for obj, _ in shapes]))


def _disk(shape, x: float, y: float, radius: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, (int(x), int(y)), radius, 1, -1)
    return mask.astype(bool)


class ShadowBleedBase:
    """Stand-in for SAM's decoder; `features` is `Scene.features` (see the module docstring).

    A box or a click on an object takes the object's blob with its shadow and without its thin
    parts. Further clicks work like SAM's, locally and imperfectly: a negative click cuts the
    shadow around it (and nicks the object's edge there), a positive click on a missed part adds
    that part of the object around it.
    """

    add_radius = 20
    cut_radius = 30
    nick = 4

    def __call__(self, features: np.ndarray, prompt: ModelPrompt) -> np.ndarray:
        base_map, objects = features[0].astype(bool), features[1].astype(bool)
        _, components = cv2.connectedComponents(base_map.astype(np.uint8), connectivity=8)
        mask = np.zeros(base_map.shape, bool)
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            bh, bw = y1 - y0, x1 - x0
            window = np.zeros_like(mask)
            window[int(max(y0 - 0.15 * bh, 0)):int(y1 + 0.15 * bh), int(max(x0 - 0.15 * bw, 0)):int(x1 + 0.15 * bw)] = True
            inner = components[int(y0 + bh / 4):int(y1 - bh / 4) + 1, int(x0 + bw / 4):int(x1 - bw / 4) + 1]
            ids, counts = np.unique(inner, return_counts=True)
            ids = ids[(counts > 0.1 * inner.size) & (ids > 0)]  # what fills the box's centre
            mask = np.isin(components, ids) & window
        points = [] if prompt.points is None else list(zip(prompt.points, prompt.labels))
        height, width = mask.shape
        for (x, y), label in points:  # a click on an object takes the whole blob (and its shadow)
            cid = components[min(int(y), height - 1), min(int(x), width - 1)]
            if label == 1 and cid > 0:
                mask |= components == cid
        for (x, y), label in points:  # later clicks correct locally
            if label == 0:
                mask &= ~(_disk(mask.shape, x, y, self.cut_radius) & ~objects)
                mask &= ~_disk(mask.shape, x, y, self.nick)
            elif not mask[min(int(y), height - 1), min(int(x), width - 1)]:
                near = _disk(mask.shape, x, y, self.add_radius)
                mask |= (near & objects) if (near & objects).any() else _disk(mask.shape, x, y, 8)
        soft = cv2.GaussianBlur(np.where(mask, 8.0, -8.0).astype(np.float32), (0, 0), 1.5)
        return soft
