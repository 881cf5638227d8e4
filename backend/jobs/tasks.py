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
from backend.pipeline.images import display_url
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


class ItemsFailed(Exception):
    """Some images or tasks of a batched job failed; the others were done. The job fails with this (its
    record lists each failure in meta["failed_items"]), so a follower reports it and a new request
    queues it again, where the done ones cost nothing (cached embeddings, drafts of this version)."""

    def __init__(self, failed: dict[str, str], total: int):
        self.failed = failed
        super().__init__(f"{len(failed)} of {total} failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, BackendError) else f"{exc.__class__.__name__}: {exc}"


def _fail_items(failed: dict[str, str], total: int) -> None:
    job = get_current_job()
    if job is not None:
        job.meta["failed_items"] = failed
        job.save_meta()
    for name, reason in failed.items():
        log.warning("%s failed: %s", name, reason)
    raise ItemsFailed(failed, total)


def warm_images(services: Services, urls: list[str]) -> dict:
    """ENCODE_BATCH_SIZE images, encoded in batched forward passes, each cached under its own key. A bad
    image fails alone: the others are cached, then the job fails naming it (ItemsFailed)."""
    failed: dict[str, str] = {}
    windows = 0
    with queues.heartbeat(services.redis):
        services.load_shared_setup()
        for url, embedding in zip(urls, services.embedder.for_urls(urls)):
            if isinstance(embedding, Exception):
                failed[display_url(url)] = _reason(embedding)
                continue
            try:
                if services.settings.warm_windows and services.predictor.zoom.applies(embedding.original_size):
                    windows += services.predictor.zoom.warm(url, embedding.original_size)
            except Exception as exc:  # this image's windows only
                failed[display_url(url)] = _reason(exc)
                continue
            queues.count_done(services.redis, queues.WARM_QUEUE)
    if failed:
        _fail_items(failed, len(urls))
    return {"images": len(urls), "windows_embedded": windows}


def warm_next_tasks(services: Services, project_id: int, task_id: int, count: int) -> dict:
    """An annotator opened `task_id`: queue the embedding of the tasks they will open next."""
    with queues.heartbeat(services.redis):
        api = services.label_studio_api()
        config = parse_label_config(api.label_config(project_id))
        urls = [task_image_url(task, config) for task in api.next_tasks(project_id, task_id, count)]
        queued = queues.enqueue_warm(services.redis, services.loader.model_id, urls, services.settings.encode_batch_size)
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
        queued = queues.enqueue_warm(services.redis, services.loader.model_id, urls, services.settings.encode_batch_size)
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


def prelabel_tasks(services: Services, project_id: int, task_ids: list[int]) -> dict:
    """prelabel_task for ENCODE_BATCH_SIZE tasks: their images encoded in batched forward passes, then each
    task drafted and posted on its own. A task that fails (its image, its draft, the post) fails alone:
    the others are posted, then the job fails naming it (ItemsFailed)."""
    failed: dict[str, str] = {}
    posted, skipped = [], []
    with queues.heartbeat(services.redis):
        api = services.label_studio_api()
        config = parse_label_config(api.label_config(project_id))
        todo = []  # (task, image url)
        for task_id in task_ids:
            try:
                task = api.task(task_id)
                version = services.predictor.draft_version(task, config, project_id)
                if any(p.get("model_version") == version for p in task["predictions"]):
                    skipped.append(task_id)
                    queues.count_done(services.redis, queues.PRELABEL_QUEUE)
                    continue
                todo.append((task, task_image_url(task, config)))
            except Exception as exc:  # this task only
                failed[f"task {task_id}"] = _reason(exc)
        timings = [Timings() for _ in todo]
        embeddings = services.embedder.for_urls([url for _, url in todo], timings)
        for (task, _), embedding, task_timings in zip(todo, embeddings, timings):
            try:
                if isinstance(embedding, Exception):
                    raise embedding
                draft = services.predictor.draft(task, embedding, config, task_timings, project_id)
                api.create_prediction(task["id"], draft["result"], draft["score"], draft["model_version"])
            except Exception as exc:  # this task only
                failed[f"task {task['id']}"] = _reason(exc)
                continue
            posted.append(task["id"])
            queues.count_done(services.redis, queues.PRELABEL_QUEUE)
            queues.record_timings(services.redis, queues.PRELABEL_QUEUE, task_timings.stages)
    if failed:
        _fail_items(failed, len(task_ids))
    return {"tasks": task_ids, "posted": posted, "skipped": skipped}


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
