"""Load SAM from a checkpoint file; encode an image once; decode prompts statelessly.

The decoder takes the embedding as an argument: no per-image state lives on the model, so any
number of threads can decode against different images at once (SamPredictor cannot).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import torch

from model import onnx_decoder
from model.checkpoints import CheckpointError
from model.prompts import ModelPrompt
from model.segmenter import Segmenter, load_strict, multimask, read_state_dict, select_device  # noqa: F401 (re-exported)
from model.segmenter import model_id as family_model_id

log = logging.getLogger(__name__)

IMAGE_SIZE = 1024  # SAM's encoder input side
PATCH_SIZE = 16
WINDOW_SIZE = 14


@dataclasses.dataclass(frozen=True)
class Architecture:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]

    @property
    def name(self) -> str:
        for name, arch in KNOWN_ARCHITECTURES.items():
            if arch == self:
                return name
        return f"custom{self.embed_dim}x{self.depth}"


KNOWN_ARCHITECTURES = {
    "vit_b": Architecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Architecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": Architecture(1280, 32, 16, (7, 15, 23, 31)),
}


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> Architecture:
    """Read the encoder's shape from the weights: official files are bare state dicts with no config."""
    try:
        embed_dim = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
        block_ids = sorted(
            {int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
        )
        rel_pos = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in block_ids]
    except (KeyError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"not a SAM checkpoint: missing {exc}") from exc
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise CheckpointError("not a SAM checkpoint: image encoder blocks are missing or out of order")
    head_dim = rel_pos[0].shape[1]
    global_size = 2 * (IMAGE_SIZE // PATCH_SIZE) - 1
    global_indexes = tuple(i for i, r in zip(block_ids, rel_pos) if r.shape[0] == global_size)
    return Architecture(embed_dim, len(block_ids), embed_dim // head_dim, global_indexes)


def build_sam(arch: Architecture) -> torch.nn.Module:
    from segment_anything.build_sam import _build_sam

    return _build_sam(
        encoder_embed_dim=arch.embed_dim,
        encoder_depth=arch.depth,
        encoder_num_heads=arch.num_heads,
        encoder_global_attn_indexes=list(arch.global_attn_indexes),
        checkpoint=None,
    )


class SamModel(Segmenter):
    """A loaded SAM: `encode` once per image, `decode` per click."""

    family = "sam"
    input_side = IMAGE_SIZE

    def __init__(self, sam: torch.nn.Module, arch: Architecture, checkpoint_digest: str, device: torch.device):
        self.sam = sam.eval().to(device)
        self.arch = arch
        self.size = arch.name
        self.device = device
        self.checkpoint_digest = checkpoint_digest
        self.onnx: onnx_decoder.OnnxDecoder | None = None

    @classmethod
    def load(
        cls, path: Path, checkpoint_digest: str, device: str = "auto", onnx_dir: Path | None = None, threads: int = 0
    ) -> "SamModel":
        """Build SAM from a checkpoint file. On CPU, with `onnx_dir`, the decoder runs in ONNX Runtime."""
        state_dict = read_state_dict(path)
        arch = infer_architecture(state_dict)
        sam = build_sam(arch)
        load_strict(sam, state_dict, path, f"SAM {arch.name}")
        log.info("loaded SAM %s from %s (sha256 %s)", arch.name, path, checkpoint_digest[:12])
        model = cls(sam, arch, checkpoint_digest, select_device(device))
        model.attach_onnx(model.sam, onnx_dir, threads)
        return model

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        """An RGB uint8 image already resized so its long side is IMAGE_SIZE: normalised, padded to a square."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float().to(self.device)
        return self.sam.preprocess(x)[0].cpu()  # SAM's own normalise-and-pad: the same pixels as always

    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(batch)  # (B, 256, 64, 64)

    def decode(self, features: np.ndarray, prompt: ModelPrompt, input_size=None) -> tuple[np.ndarray, float]:
        """Low-res mask logits (256x256, covering the padded 1024 square) and SAM's IoU estimate."""
        if self.onnx is not None:
            return self.onnx(features, *onnx_decoder.onnx_points(prompt.points, prompt.labels, prompt.box))
        return self.decode_torch(features, prompt)

    @torch.inference_mode()
    def decode_torch(self, features: np.ndarray, prompt: ModelPrompt) -> tuple[np.ndarray, float]:
        emb = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(self.device)
        points = None
        if prompt.points is not None:
            coords = torch.as_tensor(prompt.points, dtype=torch.float32, device=self.device)[None]
            labels = torch.as_tensor(prompt.labels, dtype=torch.int64, device=self.device)[None]
            points = (coords, labels)
        box = None
        if prompt.box is not None:
            box = torch.as_tensor(prompt.box, dtype=torch.float32, device=self.device)[None]
        return sam_like_decode(self.sam.prompt_encoder, self.sam.mask_decoder, emb, points, box, multimask(prompt))

    @torch.inference_mode()
    def decode_points(self, features: np.ndarray, points: np.ndarray, input_size=None):
        emb = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(self.device)
        return sam_like_points(self.sam.prompt_encoder, self.sam.mask_decoder, emb, points, self.device)


def sam_like_decode(prompt_encoder, mask_decoder, emb, points, box, multimask_output: bool):
    """SAM's prompt encoder + mask decoder (EfficientViT-SAM keeps both): best mask and its IoU estimate."""
    sparse, dense = prompt_encoder(points=points, boxes=box, masks=None)
    logits, scores = mask_decoder(
        image_embeddings=emb,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )
    best = int(torch.argmax(scores[0]))
    return logits[0, best].float().cpu().numpy(), float(scores[0, best])


def sam_like_points(prompt_encoder, mask_decoder, emb, points: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive point per prompt, all three masks each, in one batch (segment everything)."""
    batch = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    labels = torch.ones(len(batch), 1, dtype=torch.int64, device=device)
    sparse, dense = prompt_encoder(points=(batch[:, None, :], labels), boxes=None, masks=None)
    low, iou = mask_decoder(image_embeddings=emb, image_pe=prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    return low.flatten(0, 1).float().cpu(), iou.flatten().float().cpu()


def model_id(arch_name: str, checkpoint_digest: str) -> str:
    return family_model_id("sam", arch_name, checkpoint_digest)
