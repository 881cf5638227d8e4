"""The click path, top to bottom: request -> image -> embedding (cache) -> decoder -> mask -> regions."""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from backend.embeddings import Embedding, EmbeddingCache, content_digest
from backend.errors import BackendError
from backend.heads import ServedHead, ServingHeads
from backend.images import ImageFetcher, decode_image, display_url
from backend.jobs import BackgroundJobs
from backend.label_config import ProjectConfig, parse_label_config
from backend.metrics import Metrics
from backend.model_loader import ModelLoader
from backend.protocol import PredictRequest, parse_click, project_number, task_boxes, task_image_url
from backend.results import brush_region, polygon_regions
from backend.settings import Settings
from model.automatic import AutomaticConfig, segment_everything
from model.masks import logits_at_input
from model.prompts import to_model

log = logging.getLogger(__name__)


class Timings:
    """Stage durations of one request, reported in a Server-Timing header (the bench reads it)."""

    def __init__(self):
        self.stages: dict[str, float] = collections.defaultdict(float)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] += seconds

    def header(self) -> str:
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in self.stages.items())


class Embedder:
    """Embedding for an image URL: from the cache, or downloaded and encoded once (per process, per image)."""

    def __init__(self, settings: Settings, loader: ModelLoader, cache: EmbeddingCache, fetcher: ImageFetcher, metrics: Metrics):
        self.settings = settings
        self.loader = loader
        self.cache = cache
        self.fetcher = fetcher
        self.metrics = metrics
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._images: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def for_url(self, url: str, timings: Timings | None = None) -> Embedding:
        timings = timings or Timings()
        found = self.cached(url)
        if found is not None:
            return found
        start = time.perf_counter()
        data = self.fetcher.fetch(url)
        timings.add("fetch", time.perf_counter() - start)
        self.metrics.image_fetch.observe(time.perf_counter() - start)
        digest = content_digest(data)
        self.cache.remember_url(url, digest)
        return self.for_bytes(data, digest, timings)

    def cached(self, url: str) -> Embedding | None:
        """The embedding if this image was embedded before, without downloading anything."""
        digest = self.cache.url_digest(url)
        return None if digest is None else self.cache.get(self.cache.key(self.loader.model_id, digest))

    def for_bytes(self, data: bytes, digest: str, timings: Timings) -> Embedding:
        key = self.cache.key(self.loader.model_id, digest)
        found = self.cache.get(key)
        if found is not None:
            return found
        with self._lock_for(key):  # two clicks on a new image must not encode it twice
            found = self.cache.get(key)
            if found is not None:
                return found
            model = self.loader.get()
            start = time.perf_counter()
            image = decode_image(data, self.settings.max_image_pixels)
            timings.add("decode_image", time.perf_counter() - start)
            start = time.perf_counter()
            features = model.encode(image.input_image)
            elapsed = time.perf_counter() - start
            timings.add("encode", elapsed)
            self.metrics.encoder.observe(elapsed)
            embedding = Embedding.quantized(features, image.original_size, image.input_size)
            self.cache.put(key, embedding)
            self.cache.put_image(digest, image.input_image)
        with self._locks_guard:
            self._locks.pop(key, None)
        return embedding

    def input_image(self, url: str) -> np.ndarray:
        """The encoder-input image (RGB, long side 1024) that the refinement head looks at."""
        digest = self.cache.url_digest(url)
        image = None if digest is None else self._images.get(digest)
        if image is None and digest is not None:
            image = self.cache.get_image(digest)
        if image is None:  # embedded before images were kept, or evicted: download it again
            data = self.fetcher.fetch(url)
            digest = content_digest(data)
            self.cache.remember_url(url, digest)
            image = decode_image(data, self.settings.max_image_pixels).input_image
            self.cache.put_image(digest, image)
        with self._locks_guard:
            self._images[digest] = image
            self._images.move_to_end(digest)
            while len(self._images) > 4:
                self._images.popitem(last=False)
        return image

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[key]


class Predictor:
    def __init__(self, settings: Settings, loader: ModelLoader, embedder: Embedder, metrics: Metrics,
                 background: BackgroundJobs, heads: ServingHeads):
        self.settings = settings
        self.loader = loader
        self.embedder = embedder
        self.metrics = metrics
        self.background = background
        self.heads = heads

    def model_version(self, project_id: int | None) -> str:
        """SAM's version, plus the project's refinement head when one is served."""
        return self._version(self.heads.for_project(project_id))

    def _version(self, served: ServedHead | None) -> str:
        """The version of the head a result was actually made with, even if the pointer moved since."""
        return self.loader.model_version + ("" if served is None else served.model_version_suffix)

    def predict(self, request: PredictRequest, timings: Timings) -> dict:
        config = parse_label_config(request.label_config)
        if request.context is None:
            return {"results": self._batch(request, config)}
        project_id = project_number(request.project)
        return {"results": [self._click(request.tasks[0], request.context, config, timings, project_id)]}

    def _click(self, task: dict, context: list, config: ProjectConfig, timings: Timings, project_id: int | None) -> dict:
        click = parse_click(context, config)
        label = click.label or config.default_label()
        outputs = config.outputs_for(label, self.settings.output_type)
        url = task_image_url(task, config)
        self.loader.get()  # a missing checkpoint is reported before any download
        served = self.heads.for_project(project_id)
        embedding = self.embedder.for_url(url, timings)
        regions, score = self._segment(embedding, click.prompt, label, outputs, config, timings, served, url)
        return {"result": regions, "score": score, "model_version": self._version(served)}

    def _batch(self, request: PredictRequest, config: ProjectConfig) -> list[dict]:
        """One entry per task, in task order (Label Studio drops the whole answer otherwise).

        Drafts take seconds to minutes on a CPU, so none is made here: each task gets a pre-label
        job (sam-prelabel queue) that embeds the image, drafts it and posts the prediction to Label
        Studio itself. The entries carry no "result": Label Studio skips them without storing an
        empty prediction, which would stop it from asking again for this model version.
        """
        project_id = project_number(request.project)
        version = self.model_version(project_id)
        if self.settings.prelabel_on_predict:
            task_ids = [t["id"] for t in request.tasks if isinstance(t.get("id"), int)]
            if project_id is not None and task_ids:
                self.background.prelabel(project_id, task_ids, version)
                if len(task_ids) == 1 and self.settings.prefetch_tasks:  # an annotator opened this task
                    self.background.prefetch(project_id, task_ids[0], self.settings.prefetch_tasks)
            else:
                self.warm_tasks(request.tasks, config)
        pending = {"model_version": version, "score": 0.0, "status": "draft queued"}
        return [dict(pending) for _ in request.tasks]

    def warm_tasks(self, tasks: list[dict], config: ProjectConfig) -> int:
        """Queue the embedding of these tasks' images (new imports, batches without a project id)."""
        urls = []
        for task in tasks:
            try:
                urls.append(task_image_url(task, config))
            except BackendError as exc:
                log.warning("not warming task %s: %s", task.get("id"), exc.message)
        return self.background.warm(urls)

    def _draft_from_boxes(self, embedding, boxes: list, config: ProjectConfig, timings: Timings,
                          project_id: int | None, url: str | None) -> dict:
        regions, scores = [], []
        served = self.heads.for_project(project_id)
        for prompt, label in boxes:
            try:
                outputs = config.outputs_for(label, self.settings.output_type)
            except BackendError as exc:
                log.info("skipping a box: %s", exc.message)
                continue
            found, score = self._segment(embedding, prompt, label, outputs, config, timings, served, url)
            regions.extend(found)
            scores.append(score)
        score = sum(scores) / len(scores) if scores else 0.0
        return {"result": regions, "score": score, "model_version": self._version(served)}

    def draft(self, task: dict, embedding: Embedding, config: ProjectConfig, timings: Timings,
              project_id: int | None = None) -> dict:
        """A draft for a whole task: one mask per box it carries (refined by the project's head),
        else every object SAM finds."""
        boxes = task_boxes(task, config)
        if boxes:
            return self._draft_from_boxes(embedding, boxes, config, timings, project_id, task_image_url(task, config))
        label = self.settings.prelabel_label or config.default_label()
        outputs = config.outputs_for(label, self.settings.output_type)
        automatic = AutomaticConfig(points_per_side=self.settings.prelabel_points_per_side,
                                    min_area_fraction=self.settings.prelabel_min_area / 100)
        start = time.perf_counter()
        found = segment_everything(self.loader.get(), embedding.features, embedding.input_size, automatic)
        timings.add("everything", time.perf_counter() - start)
        regions = []
        for obj in found:
            regions.extend(self._regions(obj.logits, obj.score, label, outputs, config, embedding, timings))
        score = sum(o.score for o in found) / len(found) if found else 0.0
        return {"result": regions, "score": min(max(score, 0.0), 1.0), "model_version": self.model_version(project_id)}

    def _segment(self, embedding, prompt, label: str, outputs, config: ProjectConfig, timings: Timings,
                 served: ServedHead | None = None, url: str | None = None):
        """Decoder, the project's head if it has one, then the mask as every output tag wants it.
        Returns (regions, score)."""
        model = self.loader.get()
        start = time.perf_counter()
        model_prompt = to_model(prompt, embedding.input_size)
        low_res, score = model.decode(embedding.features, model_prompt)
        score = min(max(score, 0.0), 1.0)  # SAM's IoU estimate can leave [0, 1]; Label Studio wants it inside
        logits = logits_at_input(low_res, embedding.input_size)
        elapsed = time.perf_counter() - start
        timings.add("decode", elapsed)
        self.metrics.decoder.observe(elapsed)
        if served is not None and url is not None:
            start = time.perf_counter()
            image = self.embedder.input_image(url)
            if image.shape[:2] == tuple(embedding.input_size):
                logits = served.head.refine(image, logits, model_prompt)
            else:  # the file behind the URL changed since it was embedded: plain SAM rather than a misaligned head
                log.warning("image %s no longer matches its embedding; serving plain SAM for this click", display_url(url))
            elapsed = time.perf_counter() - start
            timings.add("head", elapsed)
            self.metrics.head_seconds.observe(elapsed)
        return self._regions(logits, score, label, outputs, config, embedding, timings), score

    def _regions(self, logits, score: float, label: str, outputs, config: ProjectConfig, embedding, timings) -> list:
        regions = []
        for tag in outputs:
            start = time.perf_counter()
            if tag.kind == "brush":
                regions.append(brush_region(tag, config.image_name, label, logits, embedding.original_size, score))
            else:
                regions.extend(
                    polygon_regions(
                        tag, config.image_name, label, logits, embedding.original_size, score,
                        self.settings.polygon_tolerance, self.settings.polygon_min_area,
                    )
                )
            elapsed = time.perf_counter() - start
            timings.add(tag.kind, elapsed)
            self.metrics.output.labels(tag.kind).observe(elapsed)
        return regions
