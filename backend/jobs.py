"""RQ jobs and queues. Jobs carry only JSON (never pickles) and assume nothing about the machine
that enqueued them: any worker on any machine sharing the Redis can run them.

Workers are `SimpleWorker`s: the job runs in the worker process, which loads SAM once and never
forks after that (forking after CUDA initialisation breaks CUDA).
"""

from __future__ import annotations

import hashlib
import logging
import threading

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from backend.images import display_url
from backend.settings import Settings

log = logging.getLogger(__name__)

WARM_QUEUE = "sam-warm"


def queue(connection: redis.Redis, name: str = WARM_QUEUE) -> Queue:
    return Queue(name, connection=connection, serializer=JSONSerializer)


def warm_job_id(model_id: str, url: str) -> str:
    return f"warm-{model_id}-{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def enqueue_warm(connection: redis.Redis, model_id: str, urls: list[str]) -> int:
    """Queue an embedding job per image URL; an image already queued or running is not queued twice."""
    q = queue(connection)
    added = 0
    for url in dict.fromkeys(urls):
        try:
            q.enqueue_call(
                "backend.jobs.warm_image",
                args=(url,),
                job_id=warm_job_id(model_id, url),
                unique=True,
                timeout=1800,  # vit_h on a slow CPU
                result_ttl=0,  # done: forget it, so a later eviction can queue it again
                failure_ttl=600,  # failed: keep it visible for a while, then allow a retry
                description=f"embed {display_url(url)}",
            )
            added += 1
        except DuplicateJobError:
            continue
    return added


# ---------------------------------------------------------------- worker side

_context = None
_context_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Build this worker's services (model loader, cache, image fetcher) from settings; once per process."""
    global _context
    from backend.app import Services

    with _context_lock:
        _context = Services.build(settings)


def _services():
    if _context is None:
        configure(Settings.from_env())
    return _context


def warm_image(url: str) -> dict:
    services = _services()
    services.load_shared_setup()
    embedding = services.embedder.for_url(url)
    height, width = embedding.original_size
    return {"width": width, "height": height}


def run_worker(settings: Settings, queues: list[str], burst: bool = False) -> bool:
    configure(settings)
    _context.loader.get()  # load SAM before taking the first job
    connection = _context.redis
    if connection is None:
        raise SystemExit("sam-backend worker needs REDIS_URL: the queues live in Redis")
    worker = SimpleWorker([queue(connection, name) for name in queues], connection=connection,
                          serializer=JSONSerializer)
    log.info("worker %s listening on %s", worker.name, ", ".join(queues))
    return worker.work(burst=burst, logging_level=settings.log_level)
