"""SAM 2.1 (Meta, Apache-2.0; PyPI `sam2`), its image path: Hiera encoder + FPN neck, SAM 2's prompt
encoder and mask decoder (which also reads two high-resolution feature maps).

Geometry. SAM 2 sees the image stretched to a 1024 x 1024 square (its SAM2Transforms: no padding;
that is what it was trained and evaluated on), and answers on a 256 grid over that square. The rest of
the backend works in SAM's padded frame, so prompts are stretched on the way in and the answer is
resampled into the padded square on the way out (one bilinear warp of the 256 grid, exact scale).

Cache entry. The decoder needs, besides the (256, 64, 64) image embedding, the neck's 1/4 and 1/8
features after the decoder's own 1x1 projections: (32, 256, 256) and (64, 128, 128). They are stored
in the same entry, as channels of one (1024, 64, 64) array (pixel-unshuffled: a lossless reshape),
so the cache format, its fp16 rounding and compression stay the same for every family. Recomputing
them instead would need the image pixels and most of an encoder pass for every click; storing costs
~4x SAM's entry (measured by `sam-backend bench encoder`).

Architecture. The official files ({"model": state_dict}) carry no config: the size is told by the
trunk's width and depth (hiera_t 96/12, hiera_s 96/16, hiera_b+ 112/24, hiera_l 144/48) and built
from the Hydra config the `sam2` package ships. A file may instead name its config and Hydra
overrides (keys "sam2_config" and "hydra_overrides", strings only), for other shapes (the tests'
small models use that).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import torch

from model.checkpoints import CheckpointError
from model.prompts import ModelPrompt
from model.segmenter import LOW_RES, Segmenter, load_strict, multimask, select_device

log = logging.getLogger(__name__)

FAMILY = "sam2.1"
INPUT_SIDE = 1024
CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
_SHAPES = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}
_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
_EMBED = 256  # channels of the image embedding


def is_sam2(checkpoint: dict) -> bool:
    weights = checkpoint.get("model")
    return isinstance(weights, dict) and any(k.startswith("image_encoder.trunk.") for k in weights)


def identify(checkpoint: dict) -> tuple[str, str, list[str]]:
    """(size, Hydra config, overrides) of a SAM 2.1 checkpoint."""
    weights = checkpoint["model"]
    config, overrides = checkpoint.get("sam2_config"), checkpoint.get("hydra_overrides", [])
    if config is not None:
        if config not in CONFIGS.values() or not isinstance(overrides, list) \
                or not all(isinstance(o, str) and o.startswith("++model.") for o in overrides):
            raise CheckpointError(f"sam2_config must be one of {sorted(CONFIGS.values())} with '++model.' overrides")
        width = weights["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
        return f"custom{width}x{_depth(weights)}", config, list(overrides)
    try:
        width = weights["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a SAM 2.1 checkpoint: missing {exc}") from exc
    size = _SHAPES.get((width, _depth(weights)))
    if size is None:
        raise CheckpointError(f"a SAM 2 checkpoint of no known size (trunk width {width}, {_depth(weights)} blocks); "
                              f"known: {', '.join(CONFIGS)}")
    return size, CONFIGS[size], []


def _depth(weights: dict) -> int:
    return len({int(m.group(1)) for k in weights if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))})


def build(config: str, overrides: list[str]) -> torch.nn.Module:
    try:
        from sam2.build_sam import build_sam2
    except ImportError as exc:  # an optional extra: say how to get it
        raise CheckpointError("SAM 2.1 needs the sam2 package: SAM2_BUILD_CUDA=0 pip install 'sam-backend[sam2]' "
                              f"(torch pinned on the same line) ({exc})") from exc

    # the image predictor's settings (apply_postprocessing: fall back to multimask when unstable)
    return build_sam2(config, None, device="cpu", mode="eval", hydra_overrides_extra=overrides)


class Sam2Model(Segmenter):
    family = FAMILY
    input_side = INPUT_SIDE

    def __init__(self, sam: torch.nn.Module, size: str, checkpoint_digest: str, device: torch.device):
        self.sam = sam.eval().to(device)
        self.size = size
        self.device = device
        self.checkpoint_digest = checkpoint_digest
        self.onnx = None  # SAM 2's decoder (high-res features, object scores) has no ONNX export here: torch

    @classmethod
    def load(cls, path: Path, checkpoint: dict, checkpoint_digest: str, device: str = "auto",
             onnx_dir: Path | None = None, threads: int = 0) -> "Sam2Model":
        size, config, overrides = identify(checkpoint)
        try:
            sam = build(config, overrides)
        except CheckpointError:
            raise
        except Exception as exc:  # Hydra / omegaconf errors on a bad override
            raise CheckpointError(f"cannot build SAM 2.1 from {config} with {overrides}: {exc}") from exc
        load_strict(sam, checkpoint["model"], path, f"SAM 2.1 {size}")
        log.info("loaded SAM 2.1 %s from %s (sha256 %s)", size, path, checkpoint_digest[:12])
        return cls(sam, size, checkpoint_digest, select_device(device))

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        square = cv2.resize(image, (INPUT_SIDE, INPUT_SIDE), interpolation=cv2.INTER_LINEAR) if (h, w) != (
            INPUT_SIDE, INPUT_SIDE) else image
        return torch.from_numpy((square.astype(np.float32) - _MEAN) / _STD).permute(2, 0, 1)

    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 1024, 64, 64): the image embedding, then the 1/8 and 1/4 features unshuffled."""
        backbone = self.sam.forward_image(batch)
        _, feats, _, sizes = self.sam._prepare_backbone_features(backbone)
        if self.sam.directly_add_no_mem_embed:  # what the image predictor does for a frame without memory
            feats[-1] = feats[-1] + self.sam.no_mem_embed
        # each (HW, B, C) -> (B, C, h, w)
        maps = [f.permute(1, 2, 0).reshape(len(batch), -1, *s) for f, s in zip(feats, sizes)]  # s0, s1, embedding
        s0, s1, embedding = maps
        grid = embedding.shape[-1]
        return torch.cat([embedding,
                          torch.nn.functional.pixel_unshuffle(s1, s1.shape[-1] // grid),
                          torch.nn.functional.pixel_unshuffle(s0, s0.shape[-1] // grid)], dim=1)

    def _unpack(self, features: np.ndarray):
        packed = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(self.device)
        rest = packed.shape[1] - _EMBED
        # unshuffled, s1 is 64 x 4 = 256 channels and s0 32 x 16 = 512: a third and two thirds of the rest
        embedding = packed[:, :_EMBED]
        s1 = torch.nn.functional.pixel_shuffle(packed[:, _EMBED:_EMBED + rest // 3], 2)
        s0 = torch.nn.functional.pixel_shuffle(packed[:, _EMBED + rest // 3:], 4)
        return embedding, [s0, s1]

    def _stretch(self, xy: np.ndarray, input_size) -> np.ndarray:
        h, w = _frame(input_size)
        return (np.asarray(xy, np.float32).reshape(-1, 2) * np.array([INPUT_SIDE / w, INPUT_SIDE / h], np.float32))

    def _prompt(self, prompt: ModelPrompt, input_size):
        coords, labels = [], []
        if prompt.box is not None:  # SAM 2 takes a box as two corner points, labels 2 and 3, first
            coords.append(self._stretch(prompt.box, input_size))
            labels.append(np.array([2, 3], np.int64))
        if prompt.points is not None:
            coords.append(self._stretch(prompt.points, input_size))
            labels.append(np.asarray(prompt.labels, np.int64))
        return (torch.from_numpy(np.concatenate(coords))[None].to(self.device),
                torch.from_numpy(np.concatenate(labels)).int()[None].to(self.device))

    @torch.inference_mode()
    def decode(self, features: np.ndarray, prompt: ModelPrompt, input_size=None) -> tuple[np.ndarray, float]:
        embedding, high_res = self._unpack(features)
        sparse, dense = self.sam.sam_prompt_encoder(points=self._prompt(prompt, input_size), boxes=None, masks=None)
        low, iou, _, _ = self.sam.sam_mask_decoder(
            image_embeddings=embedding, image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask(prompt), repeat_image=False, high_res_features=high_res)
        best = int(torch.argmax(iou[0]))
        return to_padded(low[0, best].float().cpu().numpy(), input_size), float(iou[0, best])

    @torch.inference_mode()
    def decode_points(self, features: np.ndarray, points: np.ndarray, input_size=None):
        embedding, high_res = self._unpack(features)
        coords = torch.from_numpy(self._stretch(points, input_size))[:, None, :].to(self.device)
        labels = torch.ones(len(coords), 1, dtype=torch.int32, device=self.device)
        sparse, dense = self.sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou, _, _ = self.sam.sam_mask_decoder(
            image_embeddings=embedding, image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=True, repeat_image=True, high_res_features=high_res)
        low = low.flatten(0, 1).float().cpu().numpy()
        return torch.from_numpy(np.stack([to_padded(m, input_size) for m in low])), iou.flatten().float().cpu()


def _frame(input_size) -> tuple[int, int]:
    if input_size is None:
        raise ValueError("SAM 2.1 decodes need the input size (its answer covers the stretched image)")
    return int(input_size[0]), int(input_size[1])


def to_padded(stretched: np.ndarray, input_size) -> np.ndarray:
    """SAM 2's 256 grid over the stretched image -> the 256 grid over the padded input square (the
    image in its top-left h x w), by bilinear sampling at each target cell's centre; cells outside
    the image get -20 (nothing there)."""
    h, w = _frame(input_size)
    side = max(h, w)
    sx, sy = side / w, side / h  # stretched cells per padded cell
    matrix = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]], np.float64)
    out = cv2.warpAffine(stretched.astype(np.float32), matrix, (LOW_RES, LOW_RES),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    rows, cols = int(np.ceil(LOW_RES * h / side)), int(np.ceil(LOW_RES * w / side))
    out[rows:, :] = -20.0
    out[:, cols:] = -20.0
    return out
