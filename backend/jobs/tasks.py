"""The bodies of the RQ jobs. Each takes the worker's Services as its first argument (the worker
passes them: backend.jobs.worker) and the job's JSON arguments after it."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from rq import get_current_job

from backend.errors import BackendError
from backend.jobs import queues
from backend.jobs.training import run_training
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.prompts import task_image_url
from backend.pipeline.timings import Timings

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the worker builds the services; a job only uses them
    from backend.services import Services


def warm_image(services: Services, url: str) -> dict:
    with queues.heartbeat(services.redis):
        services.load_shared_setup()
        embedding = services.embedder.for_url(url)
        windows = 0
        if services.settings.warm_windows and services.predictor.zoom.applies(embedding.original_size):
            windows = services.predictor.zoom.warm(url, embedding.original_size)  # WARM_WINDOWS: the window grid too
    queues.count_done(services.redis, queues.WARM_QUEUE)
    height, width = embedding.original_size
    return {"width": width, "height": height, "windows_embedded": windows}


def warm_next_tasks(services: Services, project_id: int, task_id: int, count: int) -> dict:
    """An annotator opened `task_id`: queue the embedding of the tasks they will open next."""
    with queues.heartbeat(services.redis):
        api = services.label_studio_api()
        config = parse_label_config(api.label_config(project_id))
        urls = [task_image_url(task, config) for task in api.next_tasks(project_id, task_id, count)]
        queued = queues.enqueue_warm(services.redis, services.loader.model_id, urls)
    queues.count_done(services.redis, queues.WARM_QUEUE)
    return {"next": len(urls), "queued": queued}


def warm_created_tasks(services: Services, project_id: int, task_ids: list[int]) -> dict:
    """A TASKS_CREATED webhook named these tasks: read them, and the project's label config, from
    Label Studio with the backend's own token, and embed the images of those that exist there. The
    webhook's own task data and config are never used: anyone can send one."""
    with queues.heartbeat(services.redis):
        api = services.label_studio_api()
        try:
            config = parse_label_config(api.label_config(project_id))
        except BackendError as exc:  # a project SAM cannot serve: nothing to embed
            queues.count_done(services.redis, queues.WARM_QUEUE)
            return {"project": project_id, "skipped": exc.message}
        tasks = api.tasks_by_id(project_id, task_ids)
        urls = []
        for task in tasks:
            try:
                urls.append(task_image_url(task, config))
            except BackendError as exc:
                log.warning("not warming task %s: %s", task["id"], exc.message)
        queued = queues.enqueue_warm(services.redis, services.loader.model_id, urls)
    queues.count_done(services.redis, queues.WARM_QUEUE)
    return {"project": project_id, "asked": len(task_ids), "found": len(tasks), "queued": queued}


def prelabel_task(services: Services, project_id: int, task_id: int) -> dict:
    """Post a draft prediction for one task, unless it already has one of the version it would get."""
    with queues.heartbeat(services.redis):
        api = services.label_studio_api()
        task = api.task(task_id)
        config = parse_label_config(api.label_config(project_id))
        version = services.predictor.draft_version(task, config, project_id)
        if any(p.get("model_version") == version for p in task["predictions"]):
            queues.count_done(services.redis, queues.PRELABEL_QUEUE)
            return {"task": task_id, "skipped": "already has a draft of this model version"}
        timings = Timings()
        embedding = services.embedder.for_url(task_image_url(task, config), timings)
        draft = services.predictor.draft(task, embedding, config, timings, project_id)
        prediction = api.create_prediction(task_id, draft["result"], draft["score"], draft["model_version"])
    queues.count_done(services.redis, queues.PRELABEL_QUEUE)
    queues.record_timings(services.redis, queues.PRELABEL_QUEUE, timings.stages)
    return {"task": task_id, "prediction": prediction, "regions": len(draft["result"])}


def train_project(services: Services, project_id: int) -> dict:
    """Train, evaluate and gate a new refinement head for the project (see backend.jobs.training)."""
    job = get_current_job()
    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        if job is None or (time.monotonic() - last[0] < 1.0 and done != total):
            return
        last[0] = time.monotonic()
        job.meta["progress"] = {"stage": stage, "done": done, "total": total}
        job.save_meta()

    with queues.heartbeat(services.redis):
        if services.redis is not None:
            queues.new_annotations_reset(services.redis, project_id)
        services.load_shared_setup()
        summary = run_training(services, project_id, progress)
    queues.count_done(services.redis, queues.TRAIN_QUEUE)
    queues.record_training(services.redis, project_id, summary)
    return summary
