"""`sam-backend warm|prelabel --project ID`: queue a project's jobs, optionally follow them with a progress bar."""

from __future__ import annotations

import sys

from backend.errors import BackendError, NotConfigured
from backend.jobs import queues
from backend.jobs.follow import follow_jobs
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.prompts import task_image_url
from backend.pipeline.model_loader import ModelLoader
from backend.services import Services
from backend.settings import Settings


def project_image_urls(services: Services, project_id: int, out) -> list[str]:
    api = services.label_studio_api()
    config = parse_label_config(api.label_config(project_id))
    urls = []
    for task in api.tasks(project_id):
        try:
            urls.append(task_image_url(task, config))
        except BackendError as exc:
            print(f"task {task['id']}: skipped, {exc.message}", file=out)
    return list(dict.fromkeys(urls))


def _services(settings: Settings) -> Services:
    """The command's services; NotConfigured names what to set (reported by the CLI)."""
    if not settings.redis_url:
        raise NotConfigured("set REDIS_URL to the Redis the backend and its workers use")
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise NotConfigured("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the project's tasks")
    loader = ModelLoader(settings, download=False)
    if loader.error:
        raise NotConfigured(loader.error)
    return Services.build(settings, loader)


def warm_project(settings: Settings, project_id: int, wait: bool, out=sys.stdout) -> int:
    services = _services(settings)
    model_id = services.loader.model_id
    urls = project_image_urls(services, project_id, out)
    batch = settings.encode_batch_size
    queued = queues.enqueue_warm(services.redis, model_id, urls, batch)
    print(f"project {project_id}: {len(urls)} images, {queued} queued for embedding "
          f"({len(urls) - queued} already queued or running)", file=out)
    if not wait or not urls:
        return 0
    job_ids = {job_id: chunk[0] if len(chunk) == 1 else f"{len(chunk)} images from {chunk[0]}"
               for job_id, chunk in queues.warm_batches(model_id, urls, batch)}
    return _follow(services, queues.WARM_QUEUE, job_ids, "embedding", out)


def prelabel_project(settings: Settings, project_id: int, wait: bool, out=sys.stdout) -> int:
    """A draft prediction for every task without one of the version it would get, posted by workers."""
    services = _services(settings)
    model_id = services.loader.model_id
    api = services.label_studio_api()
    parse_label_config(api.label_config(project_id))  # a wrong project id or an unusable config: say so now
    task_ids = api.task_ids(project_id)
    batch = settings.encode_batch_size
    queued = queues.enqueue_prelabel(services.redis, model_id, project_id, task_ids, batch)
    head = services.heads.for_project(project_id)
    print(f"project {project_id}: {len(task_ids)} tasks, {queued} queued for pre-labelling with "
          f"{services.loader.model_version}{f' (boxes refined by head {head.version})' if head else ''} "
          f"({len(task_ids) - queued} already queued or running; "
          "tasks that already have a draft of this version are skipped)", file=out)
    if not wait or not task_ids:
        return 0
    job_ids = {job_id: f"task {chunk[0]}" if len(chunk) == 1 else f"tasks {', '.join(map(str, chunk))}"
               for job_id, chunk in queues.prelabel_batches(model_id, task_ids, batch)}
    return _follow(services, queues.PRELABEL_QUEUE, job_ids, "pre-labelling", out)


def _follow(services: Services, queue_name: str, job_ids: dict[str, str], what: str, out) -> int:
    failures = follow_jobs(services.redis, queue_name, job_ids, what, out)
    for name, error in failures.items():
        print(f"failed: {name}: {error}", file=out)
    return 1 if failures else 0
