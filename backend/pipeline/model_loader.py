"""Resolve the checkpoint at start (cheap), load the model (any family: model/families.py) once per
process (in the background), report errors clearly.

/setup is called on every Label Studio page view and must answer `model_version` without loading
a model, so the version comes from the checkpoint's digest and shapes, read without loading weights.
"""

from __future__ import annotations

import logging
import threading

import torch

from backend.errors import ModelUnavailable
from backend.settings import Settings
from model.checkpoints import CheckpointError, checkpoint_digest, resolve_checkpoint
from model import families
from model.segmenter import Segmenter, model_version

log = logging.getLogger(__name__)


class ModelLoader:
    def __init__(self, settings: Settings, download: bool = True):
        self.settings = settings
        self._model: Segmenter | None = None
        self._lock = threading.Lock()
        self._error: str | None = None
        self.model_version = model_version(families.FAMILY_OF[settings.sam_model_type], settings.sam_model_type,
                                           "unavailable")
        self.model_id = ""
        try:
            self.path = resolve_checkpoint(
                settings.sam_model_type, settings.sam_checkpoint, settings.model_dir, download=download
            )
            digest = checkpoint_digest(self.path, settings.model_dir)
            identity = families.identify_file(self.path)
        except CheckpointError as exc:
            self._error = str(exc)
            log.error("SAM checkpoint unavailable: %s", exc)
            return
        self.digest = digest
        self.identity = identity
        self.model_id = identity.model_id(digest)  # names family, architecture and weights: caches never mix
        self.model_version = identity.model_version(digest)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

    @property
    def error(self) -> str | None:
        return self._error

    def get(self) -> Segmenter:
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                if self._error is not None:
                    raise ModelUnavailable(self._error)
                try:
                    model = families.load(
                        self.path,
                        self.digest,
                        self.settings.device,
                        onnx_dir=self.settings.model_dir / "onnx",
                        threads=self.settings.torch_threads,
                    )
                    # before it is published: another thread may take self._model without the lock
                    model.set_precision(self.settings.encode_precision)  # auto: fp32 on a CPU
                    self._model = model
                except CheckpointError as exc:
                    self._error = str(exc)
                    raise ModelUnavailable(self._error) from exc
                except Exception as exc:  # building the model failed (torch, CUDA, memory): say so, once
                    log.exception("the model could not be built")
                    self._error = f"the model could not be built from {self.path}: {exc.__class__.__name__}: {exc}"
                    raise ModelUnavailable(self._error) from exc
        return self._model

    def preload(self) -> None:
        """Load in a background thread so the first click after a worker start does not pay for it."""

        def run():
            try:
                self.get()
            except ModelUnavailable as exc:
                log.error("SAM could not be loaded: %s", exc)

        threading.Thread(target=run, name="sam-preload", daemon=True).start()
