"""The click path, top to bottom: typed request -> embedding (cache, or image + encoder) -> decoder
(+ the project's refinement head) -> mask -> Label Studio regions. Also the draft of a whole task
(boxes it carries, else segment everything) that pre-label jobs post."""

from __future__ import annotations

import logging
import time

from backend.errors import BackendError
from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.prompts import task_boxes, task_image_url
from backend.labelstudio.results import brush_region, polygon_regions
from backend.metrics import Metrics
from backend.pipeline.embeddings import Embedder, Embedding
from backend.pipeline.heads import ServedHead, ServingHeads
from backend.pipeline.images import display_url
from backend.pipeline.model_loader import ModelLoader
from backend.pipeline.timings import Timings
from backend.settings import Settings
from backend.labelstudio.protocol import ClickRequest
from model.automatic import AutomaticConfig, segment_everything
from model.masks import logits_at_input
from model.prompts import to_model

log = logging.getLogger(__name__)


class Predictor:
    def __init__(self, settings: Settings, loader: ModelLoader, embedder: Embedder, metrics: Metrics,
                 heads: ServingHeads):
        self.settings = settings
        self.loader = loader
        self.embedder = embedder
        self.metrics = metrics
        self.heads = heads

    def model_version(self, project_id: int | None) -> str:
        """SAM's version, plus the project's refinement head when one is served."""
        return self._version(self.heads.for_project(project_id))

    def _version(self, served: ServedHead | None) -> str:
        """The version of the head a result was actually made with, even if the pointer moved since."""
        return self.loader.model_version + ("" if served is None else served.model_version_suffix)

    def click(self, request: ClickRequest, timings: Timings) -> dict:
        """One Label Studio result for a smart click or box: the mask as every output tag wants it."""
        config = request.config
        label = request.click.label or config.default_label()
        outputs = config.outputs_for(label, self.settings.output_type)
        self.loader.get()  # a missing checkpoint is reported before any download
        served = self.heads.for_project(request.project_id)
        embedding = self.embedder.for_url(request.image_url, timings)
        regions, score = self._segment(embedding, request.click.prompt, label, outputs, config, timings, served,
                                       request.image_url)
        return {"result": regions, "score": score, "model_version": self._version(served)}

    def draft_version(self, task: dict, config: ProjectConfig, project_id: int | None) -> str:
        """The model version a draft of this task will carry: the head refines box prompts only, so a
        segment-everything draft is plain SAM's and a head promotion does not make it stale."""
        return self.model_version(project_id) if task_boxes(task, config) else self.loader.model_version

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
              project_id: int | None = None, automatic: AutomaticConfig | None = None) -> dict:
        """A draft for a whole task: one mask per box it carries (refined by the project's head),
        else every object SAM finds (`automatic`: the search's thresholds, from the settings by default)."""
        boxes = task_boxes(task, config)
        if boxes:
            return self._draft_from_boxes(embedding, boxes, config, timings, project_id, task_image_url(task, config))
        label = self.settings.prelabel_label or config.default_label()
        outputs = config.outputs_for(label, self.settings.output_type)
        automatic = automatic or AutomaticConfig(points_per_side=self.settings.prelabel_points_per_side,
                                                 min_area_fraction=self.settings.prelabel_min_area / 100)
        start = time.perf_counter()
        found = segment_everything(self.loader.get(), embedding.features, embedding.input_size, automatic)
        timings.add("everything", time.perf_counter() - start)
        regions = []
        for obj in found:
            regions.extend(self._regions(obj.logits, obj.score, label, outputs, config, embedding, timings))
        score = sum(o.score for o in found) / len(found) if found else 0.0
        # no head ran: plain SAM's version (see draft_version)
        return {"result": regions, "score": min(max(score, 0.0), 1.0), "model_version": self.loader.model_version}

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
