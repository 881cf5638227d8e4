"""One training run for a project: Label Studio annotations -> corrections -> candidate head ->
held-out evaluation -> gate -> registry. Run by the RQ `sam-train` job and by `sam-backend train --inline`.

Label Studio is the source of truth: every run pulls all submitted annotations again, so a
webhook that never arrived loses nothing.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import numpy as np
import redis

from backend.labelstudio.corrections import acceptance_summary, draft_changes, task_objects
from backend.errors import BackendError
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.prompts import task_image_url
from model.masks import logits_at_input
from model.prompts import ModelPrompt
from model.registry import HeadError, HeadRegistry
from model.sam import select_device
from model.train import Correction, TrainConfig, split, train_and_gate

log = logging.getLogger(__name__)

_ACCEPTANCE_KEY = "sam-backend:acceptance"

Progress = Callable[[str, int, int], None]


class SamBase:
    """Frozen SAM as the head's base: the decoder's logits over the encoder input."""

    def __init__(self, model):
        self.model = model

    def __call__(self, embedding, prompt: ModelPrompt) -> np.ndarray:
        low_res, _ = self.model.decode(embedding.features, prompt, embedding.input_size)
        return logits_at_input(low_res, embedding.input_size)


def record_acceptance(client: redis.Redis | None, project_id: int, summary: dict[str, dict]) -> None:
    if client is None or not summary:
        return
    client.hset(_ACCEPTANCE_KEY, mapping={f"{project_id}|{version}": json.dumps(row) for version, row in summary.items()})


def acceptance_rows(client: redis.Redis) -> list[dict]:
    try:
        stored = client.hgetall(_ACCEPTANCE_KEY)
    except redis.RedisError as exc:
        log.warning("cannot read draft acceptance from Redis: %s", exc)
        return []
    rows = []
    for field, value in stored.items():
        project, version = field.decode().split("|", 1)
        rows.append({"project": project, "model_version": version, **json.loads(value)})
    return rows


def collect_corrections(services, tasks: list[dict], config, progress: Progress) -> list[Correction]:
    """Each object of each submitted annotation, with its image's embedding (cached, or computed now)."""
    found = []
    for done, task in enumerate(tasks):
        objects = task_objects(task, config, services.loader.get().input_side)
        if objects:
            try:
                url = task_image_url(task, config)
                embedding = services.embedder.for_url(url)
                image = services.embedder.input_image(url)
            except BackendError as exc:  # one unreadable image must not cost the whole run
                log.warning("task %s skipped: %s", task["id"], exc.message)
                progress("corrections", done + 1, len(tasks))
                continue
            for obj in objects:
                if obj.mask.shape != tuple(embedding.input_size):
                    log.warning("task %s: annotation drawn on a %s image, the image is now %s; skipped",
                                task["id"], obj.mask.shape, embedding.input_size)
                    continue
                found.append(Correction(task["id"], image, obj.mask, embedding, obj.label))
        progress("corrections", done + 1, len(tasks))
    return found


def served_head(registry: HeadRegistry, project_id: int, base_model_id: str):
    version = registry.current(project_id)
    if version is None:
        return None, None
    try:
        return version, registry.load(project_id, version, base_model_id)
    except HeadError as exc:
        log.warning("the served head cannot be loaded (%s): comparing against plain SAM", exc)
        return None, None


def run_training(services, project_id: int, progress: Progress | None = None) -> dict:
    """Train, evaluate, gate and store a candidate head. Returns a summary (also kept in meta.json)."""
    report = progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    api = services.label_studio_api()
    config = parse_label_config(api.label_config(project_id))
    task_ids = api.annotated_task_ids(project_id)
    tasks = []
    for done, task_id in enumerate(task_ids):
        tasks.append(api.task(task_id))
        report("annotations", done + 1, len(task_ids))
    return train_on_tasks(services, project_id, tasks, config, report, started)


def train_on_tasks(services, project_id: int, tasks: list[dict], config, progress: Progress | None = None,
                   started: float | None = None) -> dict:
    """The run itself, on tasks shaped as Label Studio's API returns them (with annotations and predictions)."""
    report = progress or (lambda stage, done, total: None)
    settings = services.settings
    started = time.perf_counter() if started is None else started
    acceptance = acceptance_summary(draft_changes(tasks))
    record_acceptance(services.redis, project_id, acceptance)

    objects = collect_corrections(services, tasks, config, report)
    train, heldout = split(objects)
    summary = {"project": project_id, "tasks": len(tasks), "corrections": len(objects), "train": len(train),
               "heldout": len(heldout), "acceptance": acceptance}
    if len(train) < settings.train_min_corrections or len(heldout) < 2:
        summary.update(status="skipped", reason=(
            f"not enough corrections: {len(train)} to train on (need {settings.train_min_corrections}) and "
            f"{len(heldout)} held out (need 2; one task in 5 is held out)"))
        log.info("project %s: %s", project_id, summary["reason"])
        return summary

    model = services.loader.get()
    registry = HeadRegistry(settings.head_registry_dir)
    served_version, served = served_head(registry, project_id, services.loader.model_id)
    config_train = TrainConfig(steps=settings.train_steps)
    outcome = train_and_gate(train, heldout, SamBase(model), served, config_train, settings.train_margin,
                             select_device(settings.device), report)
    meta = {"base_model_id": services.loader.model_id, "served_version": served_version,
            "status": "promoted" if outcome.promoted else "rejected", "reason": outcome.reason,
            "metrics": outcome.metrics, "training": {**config_train.to_dict(), "margin": settings.train_margin},
            "corrections": {"train": len(train), "heldout": len(heldout), "tasks": len(tasks),
                            "samples": outcome.samples},
            "train_seconds": round(outcome.train_seconds, 2)}
    saved = registry.save(project_id, outcome.head, meta)
    if outcome.promoted:
        registry.set_current(project_id, saved.version, f"promoted: {outcome.reason}")
    summary.update(status=meta["status"], version=saved.version, reason=outcome.reason, metrics=outcome.metrics,
                   train_seconds=meta["train_seconds"], seconds=round(time.perf_counter() - started, 2))
    log.info("project %s: head %s %s (%s)", project_id, saved.version, meta["status"], outcome.reason)
    return summary
