"""Which family a SAM_MODEL_TYPE or a checkpoint file belongs to, and loading it.

SAM (vit_b, vit_l, vit_h), EfficientViT-SAM (l0, l1, l2, xl0, xl1) and SAM 2.1 (hiera_t, hiera_s,
hiera_b+, hiera_l). A checkpoint file is recognised by its weights, not its name: SAM_CHECKPOINT may
point at any of them, and the architecture is built to the weights' shape and checked against them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from model import efficientvit_family, sam2_family
from model.checkpoints import CheckpointError
from model.sam import SamModel, infer_architecture
from model.segmenter import Segmenter, model_id, model_version, read_state_dict

SAM_TYPES = ("vit_b", "vit_l", "vit_h")
EFFICIENTVIT_TYPES = tuple(efficientvit_family.INPUT_SIDES)
SAM2_TYPES = tuple(sam2_family.CONFIGS)
MODEL_TYPES = SAM_TYPES + EFFICIENTVIT_TYPES + SAM2_TYPES
FAMILY_OF = {**{t: "sam" for t in SAM_TYPES}, **{t: efficientvit_family.FAMILY for t in EFFICIENTVIT_TYPES},
             **{t: sam2_family.FAMILY for t in SAM2_TYPES}}


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a checkpoint file holds, read from its weights' names and shapes (nothing is built)."""

    family: str
    size: str

    def model_id(self, digest: str) -> str:
        return model_id(self.family, self.size, digest)

    def model_version(self, digest: str) -> str:
        return model_version(self.family, self.size, digest)


def identify(checkpoint: dict) -> Identity:
    if sam2_family.is_sam2(checkpoint):
        return Identity(sam2_family.FAMILY, sam2_family.identify(checkpoint)[0])
    if efficientvit_family.is_efficientvit(checkpoint):
        return Identity(efficientvit_family.FAMILY, efficientvit_family.identify(checkpoint))
    if any(k.startswith("image_encoder.blocks.") for k in checkpoint):
        return Identity("sam", infer_architecture(checkpoint).name)
    raise CheckpointError("not a checkpoint of SAM, SAM 2.1 or EfficientViT-SAM: its weights have none of their "
                          "image encoders' names")


def identify_file(path: Path) -> Identity:
    return identify(read_state_dict(path))


def load(path: Path, checkpoint_digest: str, device: str = "auto", onnx_dir: Path | None = None,
         threads: int = 0) -> Segmenter:
    """The model a checkpoint file holds, built to its shape, weights checked, on `device`."""
    checkpoint = read_state_dict(path)
    identity = identify(checkpoint)
    if identity.family == sam2_family.FAMILY:
        return sam2_family.Sam2Model.load(path, checkpoint, checkpoint_digest, device, onnx_dir, threads)
    if identity.family == efficientvit_family.FAMILY:
        return efficientvit_family.EfficientVitSamModel.load(path, checkpoint, checkpoint_digest, device, onnx_dir,
                                                             threads)
    return SamModel.load(path, checkpoint_digest, device, onnx_dir=onnx_dir, threads=threads)


def random_checkpoint(model_type: str, seed: int = 0) -> dict:
    """A checkpoint of the real architecture of `model_type` with random weights, as its official file
    is laid out (benchmarks only: it costs what real weights cost; its masks are noise)."""
    import torch

    torch.manual_seed(seed)
    family = FAMILY_OF[model_type]
    if family == sam2_family.FAMILY:
        return {"model": sam2_family.build(sam2_family.CONFIGS[model_type], []).state_dict()}
    if family == efficientvit_family.FAMILY:
        return efficientvit_family.build(model_type).state_dict()
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None).state_dict()


def installed(model_type: str) -> bool:
    """Whether the package a family needs can be imported here (sam2 is an optional extra)."""
    import importlib.util

    package = {"sam": "segment_anything", efficientvit_family.FAMILY: "efficientsam",
               sam2_family.FAMILY: "sam2"}[FAMILY_OF[model_type]]
    return importlib.util.find_spec(package) is not None
