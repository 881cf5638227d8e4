"""SAM's prompt encoder + mask decoder exported to ONNX Runtime: 60 ms a click on 2 CPU cores
instead of 110-160 ms in eager torch, outputs equal to ~4e-7.

Exported once per checkpoint into MODEL_DIR/onnx (about 1 s) and reused by every process.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from model.files import atomic_path

log = logging.getLogger(__name__)

try:
    import onnxruntime
except ImportError:  # optional: without it the torch decoder serves
    onnxruntime = None


def available() -> bool:
    return onnxruntime is not None


def _wrapper(sam: torch.nn.Module) -> torch.nn.Module:
    from segment_anything.utils.onnx import SamOnnxModel

    class LowResDecoder(SamOnnxModel):
        """SamOnnxModel without mask input and without upscaling: we upscale with cv2, cheaper."""

        def forward(self, image_embeddings, point_coords, point_labels):
            sparse = self._embed_points(point_coords, point_labels)
            prompt_encoder = self.model.prompt_encoder
            h, w = prompt_encoder.image_embedding_size
            dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
            masks, scores = self.model.mask_decoder.predict_masks(
                image_embeddings=image_embeddings,
                image_pe=prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
            )
            # one point: best of the three multimask outputs; more points or a box: the single output
            return self.select_masks(masks, scores, point_coords.shape[1])

    return LowResDecoder(sam, return_single_mask=True).eval()


def export(sam: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = torch.zeros(1, 256, 64, 64)
    coords = torch.tensor([[[100.0, 100.0], [0.0, 0.0]]])
    labels = torch.tensor([[1.0, -1.0]])
    with atomic_path(path, suffix=".onnx") as tmp_name, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about SAM's python-side constants
        torch.onnx.export(
            _wrapper(sam.cpu()),
            (emb, coords, labels),
            str(tmp_name),
            input_names=["image_embeddings", "point_coords", "point_labels"],
            output_names=["masks", "scores"],
            dynamic_axes={"point_coords": {1: "points"}, "point_labels": {1: "points"}},
            opset_version=17,
            dynamo=False,
        )


class OnnxDecoder:
    def __init__(self, path: Path, threads: int = 0):
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # ONNX Runtime's pool threads spin after each run, waiting for the next: with many request
        # threads and several processes on few cores that spinning takes the cores the others need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, features: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        masks, scores = self.session.run(
            None,
            {
                "image_embeddings": np.ascontiguousarray(features[None], dtype=np.float32),
                "point_coords": coords[None].astype(np.float32),
                "point_labels": labels[None].astype(np.float32),
            },
        )
        return masks[0, 0], float(scores[0, 0])


def onnx_points(points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None):
    """SAM's ONNX prompt layout: clicks (1/0), box corners as labels 2 and 3, else a padding point (-1)."""
    coords = [np.zeros((0, 2), np.float32)]
    kinds = [np.zeros(0, np.float32)]
    if points is not None:
        coords.append(points.astype(np.float32))
        kinds.append(labels.astype(np.float32))
    if box is not None:
        coords.append(box.reshape(2, 2).astype(np.float32))
        kinds.append(np.array([2, 3], np.float32))
    else:
        coords.append(np.zeros((1, 2), np.float32))
        kinds.append(np.array([-1], np.float32))
    return np.concatenate(coords), np.concatenate(kinds)
