"""The encoder's numeric precision (ENCODE_PRECISION): fp32, fp16 or bf16 through torch autocast, and the
check that decides whether a lower precision's masks hold.

Why autocast and not `model.half()`: the weights stay fp32 (the decoder, the ONNX export and the cache
format never see a half tensor), only the encoder's matmuls and convolutions run in the lower dtype, and
its outputs are cast back to fp32 before they are stored (the cache keeps fp16 either way).

"auto" is fp32 on a CPU (this project's CPUs have no fast bf16/fp16: measured far slower, DESIGN.md 4)
and on CUDA the lower precision the GPU runs natively (bf16 where supported, else fp16), kept only if its
masks agree with fp32's on a probe image (`masks_agree`); otherwise the loader falls back to fp32.
"""

from __future__ import annotations

import contextlib

import numpy as np

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# mean IoU of low-res masks (lower precision vs fp32) under which a precision is refused by "auto"
AGREEMENT_IOU = 0.9


def resolve(requested: str, device) -> str:
    """The precision to try on `device`: what was asked, or auto's pick."""
    import torch

    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device):
    """The context the encoder's forward pass runs in."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two thresholded logit maps (1.0 when both are empty: they agree)."""
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def probe_image(side: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image (smooth shapes on a textured ground) of long side `side`, 4:3."""
    rng = np.random.default_rng(seed)
    h, w = side * 3 // 4, side
    yy, xx = np.mgrid[0:h, 0:w]
    image = (rng.random((h, w, 3)) * 40 + 100).astype(np.uint8)
    for _ in range(6):
        cx, cy, r = rng.random() * w, rng.random() * h, (0.05 + rng.random() * 0.2) * h
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    return image


def masks_agree(model, image: np.ndarray, precision: str, points_per_side: int = 4) -> float:
    """Mean IoU of the masks a grid of single clicks gets from `precision`'s embedding against fp32's on
    the same image (every multimask output), on the model as loaded."""
    kept = model.precision
    try:
        model.precision = "fp32"
        reference = model.encode(image)
        model.precision = precision
        lowered = model.encode(image)
    finally:
        model.precision = kept
    h, w = image.shape[:2]
    steps = (np.arange(points_per_side) + 0.5) / points_per_side
    points = np.array([[x * w, y * h] for y in steps for x in steps], np.float32)
    ref_logits, _ = model.decode_points(reference, points, (h, w))
    low_logits, _ = model.decode_points(lowered.astype(np.float32), points, (h, w))
    return float(np.mean([mask_iou(r, q) for r, q in zip(ref_logits.numpy(), low_logits.numpy())]))
