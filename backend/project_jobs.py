"""`sam-backend warm|prelabel --project ID`: queue a project's jobs, optionally follow them with a progress bar."""

from __future__ import annotations

import sys
import time

import redis
from rq import Worker
from rq.job import JobStatus
from tqdm import tqdm

from backend import jobs
from backend.errors import BackendError
from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioApi
from backend.heads import ServingHeads
from backend.metrics import Metrics
from backend.model_loader import ModelLoader
from model.registry import HeadRegistry
from backend.protocol import task_image_url
from backend.settings import Settings


def project_image_urls(settings: Settings, project_id: int) -> list[str]:
    api = LabelStudioApi.from_settings(settings)
    config = parse_label_config(api.label_config(project_id))
    urls = []
    for task in api.tasks(project_id):
        try:
            urls.append(task_image_url(task, config))
        except BackendError as exc:
            print(f"task {task['id']}: skipped, {exc.message}", file=sys.stderr)
    return urls


def _preflight(settings: Settings, out) -> tuple[redis.Redis, ModelLoader] | None:
    if not settings.redis_url:
        print("error: set REDIS_URL to the Redis the backend and its workers use", file=out)
        return None
    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the project's tasks", file=out)
        return None
    loader = ModelLoader(settings, download=False)
    if loader.error:
        print(f"error: {loader.error}", file=out)
        return None
    return redis.Redis.from_url(settings.redis_url), loader


def warm_project(settings: Settings, project_id: int, wait: bool, out=sys.stdout) -> int:
    ready = _preflight(settings, out)
    if ready is None:
        return 2
    connection, loader = ready
    urls = list(dict.fromkeys(project_image_urls(settings, project_id)))
    queued = jobs.enqueue_warm(connection, loader.model_id, urls)
    print(f"project {project_id}: {len(urls)} images, {queued} queued for embedding "
          f"({len(urls) - queued} already queued or running)", file=out)
    if not wait or not urls:
        return 0
    job_ids = {jobs.warm_job_id(loader.model_id, u): u for u in urls}
    return _follow(connection, jobs.WARM_QUEUE, job_ids, "embedding", out)


def prelabel_project(settings: Settings, project_id: int, wait: bool, out=sys.stdout) -> int:
    """A draft prediction for every task without one of this model version, posted by workers."""
    ready = _preflight(settings, out)
    if ready is None:
        return 2
    connection, loader = ready
    heads = ServingHeads(HeadRegistry(settings.head_registry_dir), lambda: loader.model_id, Metrics())
    version = loader.model_version + heads.version_suffix(project_id)
    task_ids = LabelStudioApi.from_settings(settings).task_ids(project_id)
    queued = jobs.enqueue_prelabel(connection, version, project_id, task_ids)
    print(f"project {project_id}: {len(task_ids)} tasks, {queued} queued for pre-labelling with "
          f"{version} ({len(task_ids) - queued} already queued or running; "
          "tasks that already have a draft of this version are skipped)", file=out)
    if not wait or not task_ids:
        return 0
    job_ids = {jobs.prelabel_job_id(version, t): f"task {t}" for t in task_ids}
    return _follow(connection, jobs.PRELABEL_QUEUE, job_ids, "pre-labelling", out)


def _follow(connection: redis.Redis, queue_name: str, job_ids: dict[str, str], what: str, out) -> int:
    """Progress (done / total, rate, ETA, failures) until every job is done or failed. A finished job
    is deleted (result_ttl=0), so gone means done. A job whose worker died is queued again."""
    if Worker.count(queue=jobs.queue(connection, queue_name)) == 0:
        print(f"no worker is listening on the {queue_name} queue yet: start `sam-backend worker` "
              "(or `sam-backend serve`, which starts one)", file=out)
    failures: dict[str, str] = {}
    pending = dict(job_ids)
    with tqdm(total=len(job_ids), unit="job", desc=what, file=out) as bar:
        while pending:
            for job_id, name in list(pending.items()):
                job = jobs.fetch_job(connection, job_id)
                status = JobStatus.FINISHED if job is None else job.get_status(refresh=False)
                if status == JobStatus.STARTED and jobs.abandoned(connection, job):
                    # enqueue_unique replaces an abandoned job with a fresh one
                    jobs.enqueue_unique(connection, queue_name, job.func_name, tuple(job.args), job_id,
                                        job.description or what)
                    bar.write(f"{name}: its worker died mid-job; queued again")
                    continue
                if status == JobStatus.FAILED:
                    result = job.latest_result()
                    lines = (result.exc_string or "").strip().splitlines() if result else []
                    failures[name] = lines[-1] if lines else "failed"
                if status in (JobStatus.FINISHED, JobStatus.FAILED):
                    del pending[job_id]
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
            if pending:
                time.sleep(1)
    for name, error in failures.items():
        print(f"failed: {name}: {error}", file=out)
    return 1 if failures else 0
