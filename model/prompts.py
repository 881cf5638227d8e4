"""Prompt types and coordinate transforms.

A `Prompt` is resolution-free: coordinates are fractions of the image's width and height, as
Label Studio's percentages are. `to_model` maps it onto SAM's resized input, the only place
where pixels appear.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prompt:
    points: tuple[tuple[float, float], ...] = ()  # (x, y) fractions in [0, 1]
    labels: tuple[int, ...] = ()  # 1 positive, 0 negative
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 fractions

    def __post_init__(self):
        if len(self.points) != len(self.labels):
            raise ValueError("every point needs a label")
        if not self.points and self.box is None:
            raise ValueError("a prompt needs at least one point or a box")


@dataclasses.dataclass(frozen=True)
class ModelPrompt:
    """Prompt in pixels of the resized encoder input (long side 1024)."""

    points: np.ndarray | None  # (N, 2) float32
    labels: np.ndarray | None  # (N,) int64
    box: np.ndarray | None  # (4,) float32


def preprocess_shape(height: int, width: int, long_side: int = 1024) -> tuple[int, int]:
    """Same rounding as segment_anything's ResizeLongestSide.get_preprocess_shape."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_model(prompt: Prompt, input_size: tuple[int, int]) -> ModelPrompt:
    h, w = input_size
    scale = np.array([w, h], dtype=np.float32)
    points = labels = box = None
    if prompt.points:
        points = np.asarray(prompt.points, dtype=np.float32) * scale
        labels = np.asarray(prompt.labels, dtype=np.int64)
    if prompt.box is not None:
        box = np.asarray(prompt.box, dtype=np.float32) * np.tile(scale, 2)
    return ModelPrompt(points, labels, box)
