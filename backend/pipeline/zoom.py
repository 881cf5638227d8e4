"""Zoom windows on the request path: the decisions of model.zoom, with window embeddings cached.

A window's embedding lives in the same cache as its image's, under the image's key plus the window
(EmbeddingCache.window_key), and is encoded once anywhere (Embedder.shared: the same claim and
encode slots as whole images). Windows snap to a grid (model.windows), so the annotator's later
clicks in the same area reuse them. Only a window missing from the cache needs the image's pixels:
then the image is downloaded, decoded at full resolution once per process (a small LRU: a click
that follows a crack embeds many windows of one image), cropped and resized to the encoder's input.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import cv2
import numpy as np

from backend.errors import ImageUnavailable
from backend.metrics import Metrics
from backend.pipeline.embeddings import Embedder, Embedding, content_digest
from backend.pipeline.images import decode_full_image, display_url
from backend.pipeline.model_loader import ModelLoader
from backend.pipeline.timings import Timings
from backend.settings import Settings
from model.prompts import Prompt
from model.windows import Window, grid_windows, levels
from model.zoom import PATH_WHOLE, PixelPrompt, ZoomAnswer, ZoomConfig, answer

log = logging.getLogger(__name__)

_FULL_IMAGES = 2  # full-resolution images kept per process (60 MB each at 20 MP)


def input_side(model) -> int:
    """The encoder's input side (model.segmenter): 1024 for SAM and SAM 2.1, 512 for EfficientViT-SAM L."""
    return int(model.input_side)


class ZoomPath:
    def __init__(self, settings: Settings, loader: ModelLoader, embedder: Embedder, metrics: Metrics):
        self.settings = settings
        self.loader = loader
        self.embedder = embedder
        self.cache = embedder.cache
        self.metrics = metrics
        self._images: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._images_lock = threading.Lock()

    @property
    def config(self) -> ZoomConfig:
        s = self.settings
        return ZoomConfig(threshold=s.zoom_threshold, max_zoom=s.zoom_max, max_windows=s.zoom_max_windows,
                          edges=s.zoom_edges != "off")

    def applies(self, original_size: tuple[int, int]) -> bool:
        """Whether this image is large enough for windows (ZOOM_MIN_SIDE) and zooming is on (ZOOM_THRESHOLD)."""
        return self.settings.zoom_threshold > 0 and max(original_size) >= self.settings.zoom_min_side

    def answer(self, url: str, embedding: Embedding, prompt: Prompt, timings: Timings, whole_answer) -> ZoomAnswer:
        """The prompt's mask through windows where they see finer (model.zoom.answer); `whole_answer()`
        decodes the prompt on the whole-image embedding when the decision needs it."""
        model = self.loader.get()
        digest = self.digest(url)
        side = input_side(model)
        encoded: list[Window] = []

        def embed(window: Window):
            return self.window_embedding(url, digest, window, timings, encoded)

        def decode(window_embedding: Embedding, model_prompt):
            start = time.perf_counter()
            found = model.decode(window_embedding.features, model_prompt, window_embedding.input_size)
            timings.add("decode", time.perf_counter() - start)
            return found

        def edge_window_ok(window: Window) -> bool:
            if self.settings.zoom_edges == "always":
                return True
            return self.cache.has(self.cache.window_key(self.loader.model_id, digest, window.key))

        start = time.perf_counter()
        found = answer(PixelPrompt.from_prompt(prompt, embedding.original_size), embedding.original_size, side,
                       self.config, embed, decode, whole_answer, edge_window_ok)
        timings.add("zoom", time.perf_counter() - start)
        self.metrics.zoom_answers.labels(found.path).inc()
        if found.path != PATH_WHOLE:
            self.metrics.zoom_windows.observe(len(found.windows))
            log.info("%s answer for %s: %d window(s) of %s px, %d embedded now", found.path, display_url(url),
                     len(found.windows), sorted({w.side for w in found.windows}), len(encoded))
        found.encoded = len(encoded)
        return found

    def digest(self, url: str) -> str:
        """The content digest of the image behind the URL (remembered when it was embedded)."""
        digest = self.cache.url_digest(url)
        if digest is None:  # not kept (URL_DIGEST_TTL=0): hash the bytes once more
            digest = content_digest(self.embedder.fetcher.fetch(url))
            self.cache.remember_url(url, digest)
        return digest

    def window_embedding(self, url: str, digest: str, window: Window, timings: Timings,
                         encoded: list | None = None) -> Embedding:
        """The window's embedding from the cache, else encoded (and appended to `encoded`)."""
        key = self.cache.window_key(self.loader.model_id, digest, window.key)
        return self.embedder.shared(key, lambda: self._encode_window(key, url, digest, window, timings, encoded))

    def _encode_window(self, key: str, url: str, digest: str, window: Window, timings: Timings,
                       encoded: list | None) -> Embedding:
        image = self._full_image(url, digest, timings)
        start = time.perf_counter()
        in_h, in_w = window.input_size
        crop = window.crop(image)
        # shrinking averages pixels (as the whole image's reduced decode does); zooming interpolates
        interpolation = cv2.INTER_AREA if in_w < window.width else cv2.INTER_LINEAR
        resized = np.ascontiguousarray(cv2.resize(crop, (in_w, in_h), interpolation=interpolation))
        features = self.loader.get().encode(resized)
        elapsed = time.perf_counter() - start
        timings.add("encode", elapsed)
        if encoded is not None:
            encoded.append(window)
        self.metrics.encoder.observe(elapsed)
        self.metrics.window_encodes.inc()
        embedding = Embedding.quantized(features, (window.height, window.width), (in_h, in_w))
        self.cache.put(key, embedding)
        return embedding

    def _full_image(self, url: str, digest: str, timings: Timings) -> np.ndarray:
        with self._images_lock:
            image = self._images.get(digest)
            if image is not None:
                self._images.move_to_end(digest)
                return image
        start = time.perf_counter()
        data = self.embedder.fetcher.fetch(url)
        timings.add("fetch", time.perf_counter() - start)
        if content_digest(data) != digest:
            # windows are keyed by the image's digest: pixels of another image must never be stored under it
            self.cache.remember_url(url, content_digest(data))
            raise ImageUnavailable(f"the image at {display_url(url)} changed while it was being segmented; click again")
        start = time.perf_counter()
        image = decode_full_image(data, self.settings.max_image_pixels)
        timings.add("decode_full", time.perf_counter() - start)
        with self._images_lock:
            self._images[digest] = image
            while len(self._images) > _FULL_IMAGES:
                self._images.popitem(last=False)
        return image

    def tiles(self, original_size: tuple[int, int]) -> list[Window]:
        """The native-resolution window grid of an image (tiled drafts, warming windows); [] when the
        image is too small for windows."""
        side = input_side(self.loader.get())
        native = levels(original_size, side, 1)
        if not native or max(original_size) < self.settings.zoom_min_side:
            return []
        return grid_windows(native[-1], original_size, side)

    def warm(self, url: str, original_size: tuple[int, int], timings: Timings | None = None) -> int:
        """Embed every tile of the image that is not cached yet; returns how many were embedded."""
        timings = timings or Timings()
        digest = self.digest(url)
        encoded: list[Window] = []
        for window in self.tiles(original_size):
            self.window_embedding(url, digest, window, timings, encoded)
        return len(encoded)
