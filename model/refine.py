"""The refinement head: a small U-Net that corrects SAM's mask for one project's domain.

It looks at a square crop around the object, taken from SAM's encoder input (long side 1024):
the image, SAM's mask logits for the prompt, and the prompt drawn as maps (positive clicks,
negative clicks, box). It outputs a correction that is added to SAM's logits, so a head whose
last layer is zero is exactly plain SAM; the corrected crop is pasted back over SAM's logits.
SAM stays frozen: the head learns only what SAM gets systematically wrong here.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch
from torch import nn

from model.prompts import ModelPrompt

IN_CHANNELS = 7  # RGB, SAM logits, positive clicks, negative clicks, box
LOGIT_CLIP = 20.0


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    crop: int = 96  # side of the square the head works at
    width: int = 16  # channels of the first level; x2, x3, x4 below it
    margin: float = 0.25  # context around the object, as a fraction of its size
    min_side: int = 48  # smallest crop in input pixels (a lone click on a tiny object)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown head settings {sorted(unknown)}")
        return cls(**data)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
    )


class RefineHead(nn.Module):
    def __init__(self, config: HeadConfig = HeadConfig()):
        super().__init__()
        self.config = config
        w = config.width
        widths = (w, 2 * w, 3 * w, 4 * w)
        self.down = nn.ModuleList()
        cin = IN_CHANNELS
        for cout in widths:
            self.down.append(_block(cin, cout))
            cin = cout
        self.up = nn.ModuleList(_block(widths[i] + widths[i + 1], widths[i]) for i in reversed(range(3)))
        self.out = nn.Conv2d(w, 1, 1)
        nn.init.zeros_(self.out.weight)  # start as plain SAM
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 7, S, S) head inputs -> (N, S, S) corrected logits."""
        skips = []
        h = x
        for i, block in enumerate(self.down):
            if i:
                h = nn.functional.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        base = x[:, 3] * (LOGIT_CLIP / 2)  # undo the input scaling of SAM's logits
        return base + self.out(h)[:, 0]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.inference_mode()
    def refine(self, image: np.ndarray, logits: np.ndarray, prompt: ModelPrompt) -> np.ndarray:
        """Corrected logits over the whole encoder input (same shape as `logits`)."""
        frame = crop_frame(logits, prompt, self.config)
        x = torch.from_numpy(head_inputs(image, logits, prompt, frame, self.config.crop))[None]
        device = next(self.parameters()).device
        out = self(x.to(device))[0].float().cpu().numpy()
        return paste(logits, out, frame)


@dataclasses.dataclass(frozen=True)
class CropFrame:
    """A square of the encoder input: x0, y0 (top left, may lie outside the image) and its side."""

    x0: float
    y0: float
    side: float

    def matrix(self, size: int) -> np.ndarray:
        s = size / self.side
        return np.array([[s, 0, -self.x0 * s], [0, s, -self.y0 * s]], dtype=np.float64)

    def to_crop(self, xy: np.ndarray, size: int) -> np.ndarray:
        return (np.asarray(xy, dtype=np.float64) - [self.x0, self.y0]) * (size / self.side)


def crop_frame(logits: np.ndarray, prompt: ModelPrompt, config: HeadConfig) -> CropFrame:
    """A square around everything that matters: SAM's mask, the positive clicks and the box."""
    height, width = logits.shape
    xs, ys = [], []
    mask = logits > 0
    if mask.any():
        rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
        ys += [np.argmax(rows), height - np.argmax(rows[::-1])]
        xs += [np.argmax(cols), width - np.argmax(cols[::-1])]
    if prompt.points is not None:
        positive = prompt.points[prompt.labels == 1]
        xs += list(positive[:, 0])
        ys += list(positive[:, 1])
    if prompt.box is not None:
        xs += [prompt.box[0], prompt.box[2]]
        ys += [prompt.box[1], prompt.box[3]]
    if not xs:  # only negative clicks and an empty mask: look around the clicks
        xs, ys = list(prompt.points[:, 0]), list(prompt.points[:, 1])
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * config.margin)
    side = max(side, config.min_side)
    return CropFrame((x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side)


def _point_map(points: np.ndarray, size: int, sigma: float) -> np.ndarray:
    if len(points) == 0:
        return np.zeros((size, size), np.float32)
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, :, None] - points[:, 0][None, None, :]
    dy = grid[:, None, None] - points[:, 1][None, None, :]
    return np.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)).max(axis=2).astype(np.float32)


def head_inputs(image: np.ndarray, logits: np.ndarray, prompt: ModelPrompt, frame: CropFrame, size: int) -> np.ndarray:
    """The 7 input maps of the head, (7, size, size) float32."""
    m = frame.matrix(size)
    rgb = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA if frame.side > size else cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    crop_logits = cv2.warpAffine(logits.astype(np.float32), m, (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=-LOGIT_CLIP)
    maps = np.empty((IN_CHANNELS, size, size), np.float32)
    maps[:3] = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5
    maps[3] = np.clip(crop_logits, -LOGIT_CLIP, LOGIT_CLIP) / (LOGIT_CLIP / 2)
    sigma = size / 40
    points = np.zeros((0, 2)) if prompt.points is None else frame.to_crop(prompt.points, size)
    labels = np.zeros(0) if prompt.labels is None else prompt.labels
    maps[4] = _point_map(points[labels == 1], size, sigma)
    maps[5] = _point_map(points[labels == 0], size, sigma)
    maps[6] = 0
    if prompt.box is not None:
        (bx0, by0), (bx1, by1) = frame.to_crop(np.reshape(prompt.box, (2, 2)), size)
        maps[6, max(int(by0), 0):max(int(np.ceil(by1)), 0), max(int(bx0), 0):max(int(np.ceil(bx1)), 0)] = 1
    return maps


def crop_mask(mask: np.ndarray, frame: CropFrame, size: int) -> np.ndarray:
    """A full-frame mask as the head sees it (the training target)."""
    m = cv2.warpAffine(mask.astype(np.float32), frame.matrix(size), (size, size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return m > 0.5


def paste(logits: np.ndarray, crop_logits: np.ndarray, frame: CropFrame) -> np.ndarray:
    """Put the head's crop back over SAM's logits; outside the crop SAM's logits stay."""
    height, width = logits.shape
    size = crop_logits.shape[0]
    x0, y0 = max(int(np.floor(frame.x0)), 0), max(int(np.floor(frame.y0)), 0)
    x1 = min(int(np.ceil(frame.x0 + frame.side)), width)
    y1 = min(int(np.ceil(frame.y0 + frame.side)), height)
    out = logits.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    m = frame.matrix(size)
    m[:, 2] += m[:, :2] @ [x0, y0]  # the same map, for a destination that starts at (x0, y0)
    region = cv2.warpAffine(crop_logits.astype(np.float32), m, (x1 - x0, y1 - y0),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    out[y0:y1, x0:x1] = region
    return out
