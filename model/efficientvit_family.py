"""EfficientViT-SAM (MIT HAN Lab, Apache-2.0; PyPI `efficientsam`): SAM's prompt encoder and mask
decoder behind an EfficientViT image encoder. l0-l2 see a 512 px input, xl0-xl1 1024 px.

Its prompt encoder keeps SAM's 1024 px coordinate frame whatever the encoder's input: prompts in our
input frame (long side `input_side`) are scaled by 1024 / input_side; the 256x256 low-res answer covers
the padded 1024 square, which is our padded input square at that scale, so nothing else changes.
"""

from __future__ import annotations

import logging
import re
import types
from pathlib import Path

import numpy as np
import torch

from model.checkpoints import CheckpointError
from model.prompts import ModelPrompt
from model.sam import sam_like_decode, sam_like_points
from model.segmenter import Segmenter, load_strict, multimask, select_device

log = logging.getLogger(__name__)

FAMILY = "efficientvit_sam"
PROMPT_SIDE = 1024  # the prompt encoder's input_image_size in every size
INPUT_SIDES = {"l0": 512, "l1": 512, "l2": 512, "xl0": 1024, "xl1": 1024}
# (has a sixth backbone stage, blocks in the neck): what tells the five sizes apart in their weights
_SHAPES = {(False, 4): "l0", (False, 8): "l1", (False, 12): "l2", (True, 6): "xl0", (True, 12): "xl1"}
_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
_STD = np.array([58.395, 57.12, 57.375], np.float32)


def is_efficientvit(state_dict: dict) -> bool:
    return any(k.startswith("image_encoder.backbone.stages.") for k in state_dict) and \
        any(k.startswith("image_encoder.neck.") for k in state_dict)


def identify(state_dict: dict) -> str:
    """The size (l0 ... xl1) whose shape the weights have; anything else is a CheckpointError."""
    stages = {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.backbone\.stages\.(\d+)\.", k))}
    neck = {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.neck\.middle\.op_list\.(\d+)\.", k))}
    size = _SHAPES.get((5 in stages, len(neck)))
    if size is None:
        raise CheckpointError(f"an EfficientViT-SAM checkpoint of no known size ({len(stages)} backbone stages, "
                              f"{len(neck)} neck blocks); known: {', '.join(INPUT_SIDES)}")
    return size


def build(size: str) -> torch.nn.Module:
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    # pretrained=False: the package's own loader reads a fixed relative path; weights come from our file
    return create_efficientvit_sam_model(f"efficientvit-sam-{size}", pretrained=False)


class EfficientVitSamModel(Segmenter):
    family = FAMILY

    def __init__(self, sam: torch.nn.Module, size: str, checkpoint_digest: str, device: torch.device):
        self.sam = sam.eval().to(device)
        self.size = size
        self.input_side = INPUT_SIDES[size]
        self.device = device
        self.checkpoint_digest = checkpoint_digest
        self.onnx = None
        self._prompt_scale = PROMPT_SIDE / self.input_side

    @classmethod
    def load(cls, path: Path, state_dict: dict, checkpoint_digest: str, device: str = "auto",
             onnx_dir: Path | None = None, threads: int = 0) -> "EfficientVitSamModel":
        size = identify(state_dict)
        sam = build(size)
        load_strict(sam, state_dict, path, f"EfficientViT-SAM {size}")
        log.info("loaded EfficientViT-SAM %s from %s (sha256 %s)", size, path, checkpoint_digest[:12])
        model = cls(sam, size, checkpoint_digest, select_device(device))
        model.attach_onnx(decoder_view(model.sam), onnx_dir, threads)
        return model

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        x = (image.astype(np.float32) - _MEAN) / _STD
        padded = np.zeros((self.input_side, self.input_side, 3), np.float32)  # padded after normalising, as SAM
        padded[:h, :w] = x
        return torch.from_numpy(padded).permute(2, 0, 1)

    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(batch)  # (B, 256, 64, 64)

    def decode(self, features: np.ndarray, prompt: ModelPrompt, input_size=None) -> tuple[np.ndarray, float]:
        scaled = _scaled(prompt, self._prompt_scale)
        if self.onnx is not None:
            from model import onnx_decoder

            return self.onnx(features, *onnx_decoder.onnx_points(scaled.points, scaled.labels, scaled.box))
        return self.decode_torch(features, prompt)

    @torch.inference_mode()
    def decode_torch(self, features: np.ndarray, prompt: ModelPrompt) -> tuple[np.ndarray, float]:
        scaled = _scaled(prompt, self._prompt_scale)
        emb = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(self.device)
        points = box = None
        if scaled.points is not None:
            points = (torch.as_tensor(scaled.points, dtype=torch.float32, device=self.device)[None],
                      torch.as_tensor(scaled.labels, dtype=torch.int64, device=self.device)[None])
        if scaled.box is not None:
            box = torch.as_tensor(scaled.box, dtype=torch.float32, device=self.device)[None]
        return sam_like_decode(self.sam.prompt_encoder, self.sam.mask_decoder, emb, points, box, multimask(prompt))

    @torch.inference_mode()
    def decode_points(self, features: np.ndarray, points: np.ndarray, input_size=None):
        emb = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(self.device)
        return sam_like_points(self.sam.prompt_encoder, self.sam.mask_decoder, emb,
                               np.asarray(points, np.float32) * self._prompt_scale, self.device)


def _scaled(prompt: ModelPrompt, scale: float) -> ModelPrompt:
    return ModelPrompt(None if prompt.points is None else (prompt.points * scale).astype(np.float32), prompt.labels,
                       None if prompt.box is None else (prompt.box * scale).astype(np.float32))


def decoder_view(sam: torch.nn.Module) -> torch.nn.Module:
    """What model.onnx_decoder exports from (SAM's prompt encoder + mask decoder, the prompt frame's side)."""
    view = torch.nn.Module()
    view.prompt_encoder = sam.prompt_encoder
    view.mask_decoder = sam.mask_decoder
    view.image_encoder = types.SimpleNamespace(img_size=PROMPT_SIDE)
    return view
