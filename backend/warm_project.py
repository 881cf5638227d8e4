"""`sam-backend warm --project ID`: queue the embedding of every task's image, optionally wait with a progress bar."""

from __future__ import annotations

import sys
import time

import redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from tqdm import tqdm

from backend import jobs
from backend.errors import BackendError
from backend.label_config import parse_label_config
from backend.model_loader import ModelLoader
from backend.protocol import task_image_url
from backend.settings import Settings


def project_image_urls(settings: Settings, project_id: int) -> list[str]:
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)
    project = client.projects.get(project_id)
    config = parse_label_config(project.label_config or "")
    urls = []
    for task in client.tasks.list(project=project_id, fields="all"):
        try:
            urls.append(task_image_url({"id": task.id, "data": task.data}, config))
        except BackendError as exc:
            print(f"task {task.id}: skipped, {exc.message}", file=sys.stderr)
    return urls


def warm_project(settings: Settings, project_id: int, wait: bool, out=sys.stdout) -> int:
    if not settings.redis_url:
        print("error: set REDIS_URL to the Redis the backend and its workers use", file=out)
        return 2
    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the project's tasks", file=out)
        return 2
    loader = ModelLoader(settings, download=False)
    if loader.error:
        print(f"error: {loader.error}", file=out)
        return 2
    connection = redis.Redis.from_url(settings.redis_url)
    urls = list(dict.fromkeys(project_image_urls(settings, project_id)))
    queued = jobs.enqueue_warm(connection, loader.model_id, urls)
    print(f"project {project_id}: {len(urls)} images, {queued} queued for embedding "
          f"({len(urls) - queued} already queued or running)", file=out)
    if not wait or not urls:
        return 0
    return _follow(connection, [jobs.warm_job_id(loader.model_id, u) for u in urls], urls, out)


def _follow(connection: redis.Redis, job_ids: list[str], urls: list[str], out) -> int:
    """Progress until every job is done or failed. A finished job is deleted (result_ttl=0): gone means done."""
    if Worker.count(queue=jobs.queue(connection)) == 0:
        print("no worker is listening on the sam-warm queue yet: start `sam-backend worker` "
              "(or `sam-backend serve`, which starts one)", file=out)
    failures: dict[str, str] = {}
    pending = dict(zip(job_ids, urls))
    with tqdm(total=len(job_ids), unit="img", desc="embedding", file=out) as bar:
        while pending:
            for job_id, url in list(pending.items()):
                try:
                    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
                    status = job.get_status(refresh=True)
                except NoSuchJobError:
                    status = JobStatus.FINISHED
                if status == JobStatus.FAILED:
                    result = job.latest_result()
                    lines = (result.exc_string or "").strip().splitlines() if result else []
                    failures[url] = lines[-1] if lines else "failed"
                if status in (JobStatus.FINISHED, JobStatus.FAILED):
                    del pending[job_id]
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
            if pending:
                time.sleep(1)
    for url, error in failures.items():
        print(f"failed: {url}: {error}", file=out)
    return 1 if failures else 0
