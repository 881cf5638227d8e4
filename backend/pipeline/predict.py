"""The click path, top to bottom: typed request -> embedding (cache, or image + encoder) -> decoder
(+ the project's refinement head) -> mask -> Label Studio regions. Also the draft of a whole task
(boxes it carries, else segment everything) that pre-label jobs post."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from backend.errors import BackendError
from backend.labelstudio.label_config import PIXEL_KINDS, ProjectConfig
from backend.labelstudio.prompts import task_boxes, task_image_url
from backend.labelstudio.results import (pixel_region, pixel_region_from_mask, polygon_regions,
                                         polygon_regions_from_mask)
from backend.metrics import Metrics
from backend.pipeline.embeddings import Embedder, Embedding
from backend.pipeline.heads import ServedHead, ServingHeads
from backend.pipeline.images import display_url
from backend.pipeline.model_loader import ModelLoader
from backend.pipeline.timings import Timings
from backend.pipeline.zoom import ZoomPath
from backend.settings import Settings
from backend.labelstudio.protocol import ClickRequest
from model.automatic import AutomaticConfig, segment_everything
from model.masks import logits_at_input
from model.prompts import to_model
from model.tiles import TileObject, merge_tiles
from model.zoom import PATH_WHOLE, ZoomAnswer

log = logging.getLogger(__name__)

PATH_TILES = "tiles"  # a draft object merged from the tiles of a large image


class Predictor:
    def __init__(self, settings: Settings, loader: ModelLoader, embedder: Embedder, metrics: Metrics,
                 heads: ServingHeads):
        self.settings = settings
        self.loader = loader
        self.embedder = embedder
        self.metrics = metrics
        self.heads = heads
        self.zoom = ZoomPath(settings, loader, embedder, metrics)

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
        decoded = None
        if self.zoom.applies(embedding.original_size):
            found = self.zoom.answer(request.image_url, embedding, request.click.prompt, timings,
                                     lambda: self._decode(embedding, request.click.prompt, timings))
            if found.path != PATH_WHOLE:
                # windows are plain SAM: the head is trained on whole-image views
                regions = self._mask_regions(found, label, outputs, config, timings)
                return {"result": regions, "score": found.score, "model_version": self._version(None)}
            decoded = (found.whole_logits, found.score)
        regions, score = self._segment(embedding, request.click.prompt, label, outputs, config, timings, served,
                                       request.image_url, decoded)
        if self.zoom.applies(embedding.original_size):
            for region in regions:
                region["meta"] = {"sam_path": PATH_WHOLE}
        return {"result": regions, "score": score, "model_version": self._version(served)}

    def _decode(self, embedding, prompt, timings: Timings):
        """The prompt on the whole-image embedding: low-res logits and SAM's IoU estimate."""
        start = time.perf_counter()
        found = self.loader.get().decode(embedding.features, to_model(prompt, embedding.input_size), embedding.input_size)
        timings.add("decode", time.perf_counter() - start)
        return found

    def _polygon_bounds(self, share: int) -> dict:
        """POLYGON_MAX_VERTICES / POLYGON_MAX_PARTS for one of `share` masks of an answer: a click is
        one mask; a draft's objects share the budget, since the page draws them all at once."""
        vertices, parts = self.settings.polygon_max_vertices, self.settings.polygon_max_parts
        return {"max_vertices": max(vertices // share, 8) if vertices else 0,
                "max_parts": max(parts // share, 1) if parts else 0}

    def _mask_regions(self, found: ZoomAnswer, label: str, outputs, config: ProjectConfig, timings: Timings,
                      share: int = 1) -> list:
        """Regions from a full-resolution mask (the zoom path's): brush RLE or bitmask PNG as it is,
        polygons traced at full resolution; each region's meta says which path made it and from how
        many windows."""
        score = min(max(found.score, 0.0), 1.0)
        meta = {"sam_path": found.path, "sam_windows": len(found.windows)}
        regions = []
        for tag in outputs:
            start = time.perf_counter()
            if tag.kind in PIXEL_KINDS:
                regions.append(pixel_region_from_mask(tag, config.image_name, label, found.mask, score, meta))
            else:
                regions.extend(polygon_regions_from_mask(tag, config.image_name, label, found.mask, score,
                                                         self.settings.polygon_tolerance,
                                                         self.settings.polygon_min_area, meta,
                                                         **self._polygon_bounds(share)))
            elapsed = time.perf_counter() - start
            timings.add(tag.kind, elapsed)
            self.metrics.output.labels(tag.kind).observe(elapsed)
        return regions

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
            if url is not None and self.zoom.applies(embedding.original_size):
                zoomed = self.zoom.answer(url, embedding, prompt, timings, lambda: self._decode(embedding, prompt, timings))
                if zoomed.path != PATH_WHOLE:  # a small box on a large image: its windows, at full resolution
                    regions.extend(self._mask_regions(zoomed, label, outputs, config, timings, len(boxes)))
                    scores.append(min(max(zoomed.score, 0.0), 1.0))
                    continue
            found, score = self._segment(embedding, prompt, label, outputs, config, timings, served, url,
                                         share=len(boxes))
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
                                                 min_area_fraction=self.settings.prelabel_min_area / 100,
                                                 search=self.settings.prelabel_search)
        url = task_image_url(task, config)
        if self.settings.prelabel_tiles and self.zoom.applies(embedding.original_size) \
                and self.zoom.tiles(embedding.original_size):
            return self._draft_tiles(url, embedding, label, outputs, config, timings, automatic)
        start = time.perf_counter()
        found = segment_everything(self.loader.get(), embedding.features, embedding.input_size, automatic)
        timings.add("everything", time.perf_counter() - start)
        regions = []
        for obj in found:
            regions.extend(self._regions(obj.logits, obj.score, label, outputs, config, embedding, timings, len(found)))
        score = sum(o.score for o in found) / len(found) if found else 0.0
        # no head ran: plain SAM's version (see draft_version)
        return {"result": regions, "score": min(max(score, 0.0), 1.0), "model_version": self.loader.model_version}

    def _draft_tiles(self, url: str, embedding, label: str, outputs, config: ProjectConfig, timings: Timings,
                     automatic: AutomaticConfig) -> dict:
        """Segment everything tile by tile on the native-resolution window grid (model.tiles): objects
        merged across tile borders, then the minimum area, then one region per object at full resolution."""
        model = self.loader.get()
        size = embedding.original_size
        digest = self.zoom.digest(url)
        per_tile = dataclasses.replace(automatic, min_area_fraction=0.0)  # judged after merging, on whole objects
        objects = []
        for tile in self.zoom.tiles(size):
            tile_embedding = self.zoom.window_embedding(url, digest, tile, timings)
            start = time.perf_counter()
            # a native tile's encoder input is its pixels one for one: input-size logits are full resolution
            for obj in segment_everything(model, tile_embedding.features, tile_embedding.input_size, per_tile):
                found = TileObject.cropped(tile, obj.logits > 0, obj.score)
                if found is not None:
                    objects.append(found)
            timings.add("everything", time.perf_counter() - start)
        start = time.perf_counter()
        merged = merge_tiles(objects, size, min_area=int(np.ceil(automatic.min_area_fraction * size[0] * size[1])))
        merged = merged[: automatic.max_objects]
        timings.add("merge_tiles", time.perf_counter() - start)
        regions = []
        for obj in merged:
            answer = ZoomAnswer(obj.full(size), obj.score, PATH_TILES, [])
            regions.extend(self._mask_regions(answer, label, outputs, config, timings, len(merged)))
        score = sum(o.score for o in merged) / len(merged) if merged else 0.0
        self.metrics.zoom_answers.labels(PATH_TILES).inc(len(merged))
        return {"result": regions, "score": min(max(score, 0.0), 1.0), "model_version": self.loader.model_version}

    def _segment(self, embedding, prompt, label: str, outputs, config: ProjectConfig, timings: Timings,
                 served: ServedHead | None = None, url: str | None = None, decoded=None, share: int = 1):
        """Decoder (unless `decoded` already holds its answer), the project's head if it has one, then
        the mask as every output tag wants it. Returns (regions, score)."""
        model = self.loader.get()
        start = time.perf_counter()
        model_prompt = to_model(prompt, embedding.input_size)
        low_res, score = decoded if decoded is not None else model.decode(embedding.features, model_prompt,
                                                                           embedding.input_size)
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
        return self._regions(logits, score, label, outputs, config, embedding, timings, share), score

    def _regions(self, logits, score: float, label: str, outputs, config: ProjectConfig, embedding, timings,
                 share: int = 1) -> list:
        regions = []
        for tag in outputs:
            start = time.perf_counter()
            if tag.kind in PIXEL_KINDS:
                regions.append(pixel_region(tag, config.image_name, label, logits, embedding.original_size, score))
            else:
                regions.extend(
                    polygon_regions(
                        tag, config.image_name, label, logits, embedding.original_size, score,
                        self.settings.polygon_tolerance, self.settings.polygon_min_area,
                        **self._polygon_bounds(share),
                    )
                )
            elapsed = time.perf_counter() - start
            timings.add(tag.kind, elapsed)
            self.metrics.output.labels(tag.kind).observe(elapsed)
        return regions
