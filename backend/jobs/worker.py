"""`sam-backend worker`: an RQ SimpleWorker whose jobs receive the worker's Services.

SimpleWorker runs each job in the worker process, which loads SAM once and never forks after
that (forking after CUDA initialisation breaks CUDA). The services are handed to each job by the
job class this worker dequeues with, so a job body (backend.jobs.tasks) gets them as an argument.
"""

from __future__ import annotations

import logging
import threading

import redis
from rq import SimpleWorker
from rq.job import Job
from rq.worker.base import StopRequested
from rq.serializers import JSONSerializer

from backend.jobs import queues
from backend.jobs.queues import queue
from backend.services import Services

log = logging.getLogger(__name__)

_SWEEP_LOCK = "sam-backend:sweep"


def _job_class(services: Services) -> type[Job]:
    class ServicesJob(Job):
        def _execute(self):
            return self.func(services, *self.args, **self.kwargs)

    return ServicesJob


class ServicesWorker(SimpleWorker):
    """Remembers an error that made RQ's loop quit (RQ logs it and returns normally), so that
    `sam-backend worker` can exit non-zero and a supervisor restarts it."""

    crashed: BaseException | None = None

    def dequeue_job_and_maintain_ttl(self, *args, **kwargs):
        try:
            return super().dequeue_job_and_maintain_ttl(*args, **kwargs)
        except StopRequested:  # SIGTERM: a clean stop
            raise
        except Exception as exc:
            self.crashed = exc
            raise

    def execute_job(self, job, queue):
        try:
            return super().execute_job(job, queue)
        except StopRequested:
            raise
        except Exception as exc:
            self.crashed = exc
            raise


def build_worker(services: Services, queue_names: list[str]) -> ServicesWorker:
    if services.redis is None:
        raise SystemExit("sam-backend worker needs REDIS_URL: the queues live in Redis")
    # a client of its own: RQ raises its socket timeout to the dequeue timeout (~7 min), which on the
    # services' client would make every cache call and heartbeat hang that long on a dead Redis
    connection = redis.Redis.from_url(services.settings.redis_url)
    return ServicesWorker([queue(connection, name) for name in queue_names], connection=connection,
                          serializer=JSONSerializer, job_class=_job_class(services))


def sweep_forever(services: Services, queue_names: list[str], stop: threading.Event,
                  every: float = queues.ALIVE_TTL / 2) -> None:
    """Queue again the jobs of workers that died (any worker, any machine), so that no job waits for
    someone to re-run a command. One sweep per interval across all workers (a short Redis lock)."""
    lock = f"{_SWEEP_LOCK}:{','.join(sorted(queue_names))}"  # per set of queues: each set gets swept
    while not stop.wait(every):
        try:
            if services.redis.set(lock, 1, nx=True, ex=max(int(every), 1)):
                queues.requeue_abandoned(services.redis, queue_names, services.settings.job_max_retries)
        except redis.RedisError as exc:
            log.warning("sweeping for jobs of dead workers failed: %s", exc)


def sweep_once(services: Services, queue_names: list[str]) -> None:
    """The sweep, before the worker takes its first job: RQ's own start-up maintenance fails a dead
    worker's job outright once its registry entry expires (job timeout + 60 s, e.g. after every
    worker was down for half an hour); sweeping first retries it instead."""
    try:
        queues.requeue_abandoned(services.redis, queue_names, services.settings.job_max_retries)
    except redis.RedisError as exc:
        log.warning("sweeping for jobs of dead workers failed: %s", exc)


def run_worker(services: Services, queue_names: list[str], burst: bool = False) -> int:
    """Work the queues, first named first. The exit code: 0 when it stopped as asked (SIGTERM, or
    the queues ran empty with `burst`), 1 when RQ's loop quit on an error."""
    worker = build_worker(services, queue_names)
    services.loader.get()  # load SAM before taking the first job
    log.info("worker %s listening on %s", worker.name, ", ".join(queue_names))
    sweep_once(services, queue_names)
    stop = threading.Event()
    sweeper = threading.Thread(target=sweep_forever, args=(services, queue_names, stop), name="sweep", daemon=True)
    sweeper.start()
    try:
        worker.work(burst=burst, logging_level=services.settings.log_level)
    finally:
        stop.set()
    asked_to_stop = worker._stop_requested or worker._shutdown_requested_date is not None  # SIGTERM / SIGINT
    if worker.crashed is not None or not (burst or asked_to_stop):
        log.error("worker %s quit on an error: %r", worker.name, worker.crashed)
        return 1
    return 0
