"""What every model family offers the rest of the backend (SAM, EfficientViT-SAM, SAM 2.1), and the
helpers they share: reading a checkpoint as data, picking the device, the ONNX decoder, names.

The contract, the same for every family, so the click path, the cache, segment everything, the
refinement head and the zoom windows never ask which family they hold:

- `input_side`: the encoder's square input (1024 for SAM, SAM 2.1 and EfficientViT-SAM XL; 512 for
  EfficientViT-SAM L). Images are resized so their long side is `input_side` (the "input frame").
- `encode(image)`: one (C, 64, 64) float32 array per image (C = 256, or more where a family needs more
  than the image embedding: SAM 2.1 packs its high-resolution features in, see model/sam2_family.py).
- `encode_batch(images)`: the same for many images in one forward pass (GPU workers: ENCODE_BATCH_SIZE);
  `encode` is a batch of one, so both run the same code. `precision` (model/precision.py) is the
  encoder's dtype.
- `decode(features, prompt, input_size)`: prompt in input-frame pixels -> 256x256 low-res logits over
  the padded input_side square (SAM's convention: the image in the top-left corner) and the IoU estimate.
- `decode_points(features, points, input_size)`: many single-point prompts at once, every multimask
  output (segment everything on a GPU).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from model import onnx_decoder, precision as precisions
from model.checkpoints import CheckpointError
from model.prompts import ModelPrompt

log = logging.getLogger(__name__)

LOW_RES = 256  # the mask decoder's output grid, every family


def read_state_dict(path: Path) -> dict:
    # weights_only: a checkpoint is data, never code; mmap: peeking at shapes must not read 2.4 GB
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt / foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state_dict


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"DEVICE={requested} but CUDA is not available on this machine")
    return torch.device(requested)


def load_strict(module: torch.nn.Module, state_dict: dict, path: Path, what: str) -> None:
    """Weights into the architecture they were identified as: any missing, extra or misshapen
    tensor is a CheckpointError naming the file, never a traceback out of torch."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match a {what} model: {str(exc)[:2000]}") from exc


def multimask(prompt: ModelPrompt) -> bool:
    """A lone click or a lone box is ambiguous (part or whole): take the best of three masks, the rule
    of SAM's own ONNX export, so both decoders agree."""
    clicks = 0 if prompt.points is None else len(prompt.points)
    return (clicks == 1 and prompt.box is None) or (clicks == 0 and prompt.box is not None)


def safe_id(text: str) -> str:
    """Cache keys and RQ job ids take only these characters ("hiera_b+" -> "hiera_bplus")."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("+", "plus"))


class Segmenter:
    """The interface of a loaded model (see the module's docstring). Subclasses set the attributes."""

    family: str  # "sam", "efficientvit_sam", "sam2.1": names the family in model_version
    size: str  # the SAM_MODEL_TYPE value (vit_b, l0, hiera_t, ...) or customNNN for other shapes
    input_side: int
    device: torch.device
    checkpoint_digest: str
    onnx: onnx_decoder.OnnxDecoder | None = None
    precision: str = "fp32"  # the encoder's dtype under autocast: fp32, fp16, bf16 (model/precision.py)

    @property
    def model_id(self) -> str:
        """Names what the embeddings depend on: family, architecture and weights (cache keys, job ids)."""
        return model_id(self.family, self.size, self.checkpoint_digest)

    @property
    def model_version(self) -> str:
        return model_version(self.family, self.size, self.checkpoint_digest)

    def check_input(self, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or max(image.shape[:2]) != self.input_side:
            raise ValueError(f"encode wants an RGB image with long side {self.input_side}, got {image.shape}")

    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.encode_batch([image])[0]

    @torch.inference_mode()
    def encode_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One forward pass for all `images` (each RGB uint8, long side `input_side`; the short sides may
        differ: every family feeds its encoder a square). One float32 array per image, in order."""
        for image in images:
            self.check_input(image)
        batch = torch.stack([self.input_tensor(image) for image in images]).to(self.device)
        with precisions.autocast(self.precision, self.device):
            features = self.encode_tensor(batch)
        return list(features.float().cpu().numpy())

    def input_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(3, S, S) float32 on the CPU: the family's normalisation and padding (or stretch) of one image."""
        raise NotImplementedError

    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, 64, 64): the encoder's forward pass."""
        raise NotImplementedError

    def set_precision(self, requested: str, probe: np.ndarray | None = None) -> str:
        """ENCODE_PRECISION: `auto` tries the device's lower precision and keeps it only if its masks agree
        with fp32's on `probe` (precisions.AGREEMENT_IOU); an explicit fp16/bf16 is used as asked."""
        chosen = precisions.resolve(requested, self.device)
        if requested == "auto" and chosen != "fp32":
            probe = precisions.probe_image(self.input_side) if probe is None else probe
            iou = precisions.masks_agree(self, probe, chosen)
            if iou < precisions.AGREEMENT_IOU:
                log.warning("%s masks agree with fp32 only to IoU %.3f: encoding in fp32", chosen, iou)
                chosen = "fp32"
            else:
                log.info("encoding in %s (masks agree with fp32 to IoU %.3f)", chosen, iou)
        self.precision = chosen
        return chosen

    def decode(self, features: np.ndarray, prompt: ModelPrompt,
               input_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def decode_points(self, features: np.ndarray, points: np.ndarray,
                      input_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N*K, 256, 256) logits and (N*K,) IoU estimates: every multimask output of every point."""
        raise NotImplementedError

    def attach_onnx(self, decoder_view: torch.nn.Module, onnx_dir: Path | None, threads: int) -> None:
        """On a CPU, with `onnx_dir`, decode in ONNX Runtime (tests compare its outputs with torch's for
        every family); an export that fails leaves the torch decoder serving."""
        if onnx_dir is None or self.device.type != "cpu" or not onnx_decoder.available():
            return
        onnx_path = onnx_dir / f"decoder-{self.model_id}.onnx"
        try:
            if not onnx_path.is_file():
                log.info("exporting the mask decoder to %s", onnx_path)
                onnx_decoder.export(decoder_view, onnx_path)
            self.onnx = onnx_decoder.OnnxDecoder(onnx_path, threads)
        except Exception as exc:  # exporter and runtime raise many types (TypeError on an older torch)
            # the ONNX decoder is a speed-up only: the same decoder runs in torch
            log.warning("the mask decoder cannot run in ONNX Runtime (%s: %s); decoding in torch",
                        exc.__class__.__name__, exc)
            self.onnx = None


def model_id(family: str, size: str, checkpoint_digest: str) -> str:
    if family == "sam":  # SAM's ids predate the other families: kept, so existing caches stay valid
        return f"{size}-{checkpoint_digest[:12]}"
    return safe_id(f"{family}-{size}-{checkpoint_digest[:12]}")


def model_version(family: str, size: str, checkpoint_digest: str) -> str:
    """What Label Studio shows and stores with predictions: sam-vit_b-ec2df6273261, sam2.1-hiera_t-...,
    efficientvit_sam-l0-..."""
    if family == "sam":
        return f"sam-{size}-{checkpoint_digest[:12]}"
    return f"{family}-{size}-{checkpoint_digest[:12]}"
