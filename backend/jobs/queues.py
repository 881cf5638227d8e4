"""RQ queues: names, job ids, de-duplicated enqueueing, liveness, counts, and BackgroundJobs (what web
workers queue). Jobs carry only JSON (never pickles) and assume nothing about the machine that
enqueued them: any worker on any machine sharing the Redis can run them (bodies: backend.jobs.tasks).

One job per image (warm) or per task and SAM checkpoint (prelabel), by job id: a second request
while one is queued or running adds nothing. A running job refreshes a heartbeat key; a job whose
worker died (SIGKILL, lost machine) stops beating, and any worker's periodic sweep queues it again
(at most JOB_MAX_RETRIES times, then it fails saying why). These records live in the job store's
Redis, which never evicts (the embedding cache has a Redis of its own: backend/web/embedded_redis.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from datetime import datetime, timezone

import redis
from rq import Queue, get_current_job
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.errors import BackendError
from backend.labelstudio.label_config import ProjectConfig
from backend.labelstudio.prompts import task_image_url
from backend.pipeline.images import display_url
from backend.settings import Settings

log = logging.getLogger(__name__)

WARM_QUEUE = "sam-warm"
PRELABEL_QUEUE = "sam-prelabel"
TRAIN_QUEUE = "sam-train"
# a worker takes embedding jobs first (annotators wait on those), training last
QUEUES = (WARM_QUEUE, PRELABEL_QUEUE, TRAIN_QUEUE)
ALIVE_TTL = 20  # seconds without a heartbeat after which a started job counts as abandoned
RECORD_TTL = 24 * 3600  # how long a finished job's record stays: `--wait` tells "done" from "gone" with it
_BEAT_EVERY = 5


RISK_EVICTION = "eviction"  # jobs or their records can vanish while everything runs
RISK_PERSISTENCE = "persistence"  # a restart of the Redis loses what is queued
RISK_UNKNOWN = "unknown"  # the configuration could not be read


def store_risks(connection: redis.Redis, shares_cache: bool = False) -> list[str]:
    """What could make the job store's Redis lose queued jobs or job records; empty when nothing is
    known. Logged as warnings when a process builds its services; `sam-backend doctor` reports them.

    `shares_cache`: the embedding cache lives in this Redis too (CACHE_REDIS_URL unset, or the same
    URL). The design keeps the two apart (README "Configure"): the store with `noeviction` and
    persistence, the cache with `allkeys-lru` and a `maxmemory`.
    """
    return [message for _, message in store_risk_kinds(connection, shares_cache)]


def store_risk_kinds(connection: redis.Redis, shares_cache: bool = False) -> list[tuple[str, str]]:
    """store_risks, each with its kind (RISK_EVICTION, RISK_PERSISTENCE, RISK_UNKNOWN)."""
    try:
        config = connection.config_get("maxmemory*")
        config.update(connection.config_get("save"))
        config.update(connection.config_get("appendonly"))
    except redis.ResponseError:  # managed Redis services may refuse CONFIG: nothing to tell
        return []
    except redis.RedisError as exc:
        return [(RISK_UNKNOWN, f"cannot check the job store's Redis: {exc}")]
    policy, limit = config.get("maxmemory-policy", ""), int(config.get("maxmemory") or 0)
    risks: list[tuple[str, str]] = []
    if policy.startswith("allkeys"):
        risks.append((RISK_EVICTION,
                      f"the job store's Redis has maxmemory-policy {policy}: queued jobs and job records can be "
                      "evicted when memory fills up; use noeviction there and put the embeddings in CACHE_REDIS_URL "
                      "(a second Redis with allkeys-lru)"))
    elif policy.startswith("volatile") and shares_cache:
        risks.append((RISK_EVICTION,
                      f"the job store's Redis also holds the embedding cache (CACHE_REDIS_URL unset) with {policy}: "
                      "embeddings carry a TTL and go first (none with EMBEDDING_TTL=0: then nothing can be evicted "
                      "and writes fail), but finished-job records and heartbeats carry a TTL too; give the cache a "
                      "Redis of its own and use noeviction here"))
    elif policy.startswith("volatile"):
        risks.append((RISK_EVICTION,
                      f"the job store's Redis has maxmemory-policy {policy}: finished-job records and heartbeats "
                      "carry a TTL and can be evicted (a follower then reports a finished job lost, and a running "
                      "job is run twice); use noeviction"))
    elif shares_cache and limit:
        risks.append((RISK_EVICTION,
                      f"the job store's Redis also holds the embedding cache (CACHE_REDIS_URL unset) with {policy}: "
                      "when it fills up, cache writes and job enqueues fail; give the cache its own Redis"))
    if not config.get("save") and config.get("appendonly") == "no":
        risks.append((RISK_PERSISTENCE, "the job store's Redis does not persist (no save points, appendonly no): "
                                        "a restart loses every queued job; use appendonly yes"))
    return risks


def queue(connection: redis.Redis, name: str = WARM_QUEUE) -> Queue:
    return Queue(name, connection=connection, serializer=JSONSerializer)


def warm_job_id(model_id: str, url: str) -> str:
    return f"warm-{model_id}-{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def prelabel_job_id(model_id: str, task_id: int) -> str:
    """Per SAM checkpoint and task, not per head: the job decides the version its draft carries, so a
    head promotion re-queues nothing that is queued already."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_id)  # RQ job ids allow only these
    return f"prelabel-{safe}-{task_id}"


def train_job_id(project_id: int) -> str:
    return f"train-{project_id}"


def _new_annotations_key(project_id: int) -> str:
    return f"sam-backend:train:new:{project_id}"


def _alive_key(job_id: str) -> str:
    return f"sam-backend:alive:{job_id}"


def fetch_job(connection: redis.Redis, job_id: str) -> Job | None:
    """A snapshot of the job (one HGETALL), or None when no record of it exists. Read its status with
    get_status(refresh=False): a refresh is a second read, and the record can change between the two."""
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None


def fetch_jobs(connection: redis.Redis, job_ids: list[str]) -> list[Job | None]:
    """Snapshots of many jobs in one round trip (None where no record exists)."""
    return Job.fetch_many(job_ids, connection=connection, serializer=JSONSerializer)


def abandoned(connection: redis.Redis, job: Job) -> bool:
    """Started, but its worker stopped beating: the worker died mid-job."""
    if job.get_status(refresh=False) != JobStatus.STARTED or connection.exists(_alive_key(job.id)):
        return False
    started = job.started_at
    if started is None:
        return False
    if started.tzinfo is None:
        started = started.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - started).total_seconds() > ALIVE_TTL


def enqueue_unique(connection: redis.Redis, queue_name: str, func: str, args: tuple, job_id: str,
                   description: str, timeout: int = 1800, retries: int = 0) -> str:
    """Queue a job unless the same one is queued or running. Returns "queued", "requeued" or "waiting".

    A finished, failed, stopped or abandoned job with that id is replaced: that is how a request
    runs a job again, and how a job lost to a dead worker is retried (`retries` counts those).
    """
    q = queue(connection, queue_name)
    for attempt in range(2):
        try:
            q.enqueue_call(func, args=args, job_id=job_id, unique=True, timeout=timeout,
                           # a short record of each finished job: followers tell "done" from "gone"
                           result_ttl=RECORD_TTL, failure_ttl=24 * 3600, description=description,
                           meta={"retries": retries})
            return "queued" if attempt == 0 else "requeued"
        except DuplicateJobError:
            job = fetch_job(connection, job_id)
            if job is None:
                continue  # its record expired between the two calls
            status = job.get_status(refresh=False)
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED) \
                    or abandoned(connection, job):
                log.info("replacing %s job %s", status, job_id)
                job.delete()
                continue
            return "waiting"
    return "waiting"


def requeue_abandoned(connection: redis.Redis, queue_names: list[str], max_retries: int) -> dict[str, str]:
    """Started jobs whose worker died (no heartbeat): queued again, at most `max_retries` times, then
    failed with the reason. Run by every worker now and then, so nobody has to re-run a command.
    Returns {job id: "requeued" | "failed"}."""
    done: dict[str, str] = {}
    for name in queue_names:
        registry = queue(connection, name).started_job_registry
        for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
            job = fetch_job(connection, job_id)
            if job is None or not abandoned(connection, job):
                continue
            retries = int(job.get_meta(refresh=False).get("retries", 0))
            connection.zrem(registry.key, f"{job_id}:{execution_id}")  # the dead worker's execution
            if retries >= max_retries:
                message = f"its worker died {retries + 1} times while running it (JOB_MAX_RETRIES={max_retries})"
                job.meta["failure"] = message
                job.save_meta()
                job.set_status(JobStatus.FAILED)
                queue(connection, name).failed_job_registry.add(job, ttl=24 * 3600, exc_string=message)
                log.error("job %s failed: %s", job_id, message)
                done[job_id] = "failed"
                continue
            enqueue_unique(connection, name, job.func_name, tuple(job.args), job_id, job.description or job_id,
                           job.timeout or 1800, retries=retries + 1)
            log.warning("job %s: its worker died mid-job; queued again (retry %d of %d)", job_id, retries + 1,
                        max_retries)
            done[job_id] = "requeued"
    return done


# a 20 MP image drafted tile by tile (PRELABEL_TILES) or warmed with its windows (WARM_WINDOWS) costs
# 70 window encodes: 20-40 minutes on a 2-core CPU. A dead worker is noticed by its heartbeat, not this.
IMAGE_JOB_TIMEOUT = 4 * 3600


def warm_batches(model_id: str, urls: list[str], batch: int = 1) -> list[tuple[str, list[str]]]:
    """(job id, image URLs) of the warm jobs for `urls`: one job per image, or with ENCODE_BATCH_SIZE > 1
    one job per `batch` images (encoded in one forward pass), its id made of its URLs so the same
    request queues the same jobs and de-duplicates as one-image jobs do."""
    urls = list(dict.fromkeys(urls))
    if batch <= 1:
        return [(warm_job_id(model_id, url), [url]) for url in urls]
    chunks = [urls[n:n + batch] for n in range(0, len(urls), batch)]
    return [(f"warm-{model_id}-batch-{hashlib.sha256(json.dumps(c).encode()).hexdigest()[:32]}", c) for c in chunks]


def enqueue_warm(connection: redis.Redis, model_id: str, urls: list[str], batch: int = 1) -> int:
    """Queue the embedding of these image URLs (see warm_batches). Returns how many images were queued now."""
    queued = 0
    for job_id, chunk in warm_batches(model_id, urls, batch):
        if len(chunk) == 1 and batch <= 1:
            state = enqueue_unique(connection, WARM_QUEUE, "backend.jobs.tasks.warm_image", (chunk[0],), job_id,
                                   f"embed {display_url(chunk[0])}", IMAGE_JOB_TIMEOUT)
        else:
            state = enqueue_unique(connection, WARM_QUEUE, "backend.jobs.tasks.warm_images", (chunk,), job_id,
                                   f"embed {len(chunk)} images from {display_url(chunk[0])}", IMAGE_JOB_TIMEOUT)
        queued += len(chunk) if state != "waiting" else 0
    return queued


def created_job_id(model_id: str, project_id: int, task_ids: list[int]) -> str:
    digest = hashlib.sha256(json.dumps(sorted(task_ids)).encode()).hexdigest()[:16]
    return f"created-{model_id}-{project_id}-{digest}"


def enqueue_created(connection: redis.Redis, model_id: str, project_id: int, task_ids: list[int]) -> int:
    """One job that reads these new tasks from Label Studio and queues their images' embeddings."""
    state = enqueue_unique(connection, WARM_QUEUE, "backend.jobs.tasks.warm_created_tasks", (project_id, task_ids),
                           created_job_id(model_id, project_id, task_ids),
                           f"read {len(task_ids)} new tasks of project {project_id} and embed their images")
    return int(state != "waiting")


def prelabel_batches(model_id: str, task_ids: list[int], batch: int = 1) -> list[tuple[str, list[int]]]:
    """(job id, task ids) of the pre-label jobs: one per task, or with ENCODE_BATCH_SIZE > 1 one per `batch`
    tasks, whose images are encoded in one forward pass (ids made of the tasks, as warm_batches)."""
    task_ids = list(dict.fromkeys(task_ids))
    if batch <= 1:
        return [(prelabel_job_id(model_id, t), [t]) for t in task_ids]
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_id)
    chunks = [task_ids[n:n + batch] for n in range(0, len(task_ids), batch)]
    return [(f"prelabel-{safe}-{c[0]}-n{len(c)}-{hashlib.sha256(json.dumps(c).encode()).hexdigest()[:16]}", c)
            for c in chunks]


def enqueue_prelabel(connection: redis.Redis, model_id: str, project_id: int, task_ids: list[int],
                     batch: int = 1) -> int:
    """Queue the drafts of these tasks (see prelabel_batches). Returns how many tasks were queued now."""
    queued = 0
    for job_id, chunk in prelabel_batches(model_id, task_ids, batch):
        if batch <= 1:
            state = enqueue_unique(connection, PRELABEL_QUEUE, "backend.jobs.tasks.prelabel_task",
                                   (project_id, chunk[0]), job_id,
                                   f"pre-label task {chunk[0]} of project {project_id}", IMAGE_JOB_TIMEOUT)
        else:
            state = enqueue_unique(connection, PRELABEL_QUEUE, "backend.jobs.tasks.prelabel_tasks", (project_id, chunk),
                                   job_id, f"pre-label tasks {chunk[0]}..{chunk[-1]} ({len(chunk)}) of project "
                                   f"{project_id}", IMAGE_JOB_TIMEOUT)
        queued += len(chunk) if state != "waiting" else 0
    return queued


def enqueue_train(connection: redis.Redis, project_id: int, timeout: int) -> str:
    """One training job per project at a time: requests while one is queued or running add nothing."""
    return enqueue_unique(connection, TRAIN_QUEUE, "backend.jobs.tasks.train_project", (project_id,),
                          train_job_id(project_id), f"train the refinement head of project {project_id}", timeout)


def note_annotation(connection: redis.Redis, project_id: int, every: int, timeout: int) -> str | None:
    """Count a submitted annotation; every `every` of them, queue a training run (debounced: a burst
    of webhooks while a run is queued or running queues nothing more). Returns the queue state or None."""
    count = connection.incr(_new_annotations_key(project_id))
    if every <= 0 or count < every:
        return None
    return enqueue_train(connection, project_id, timeout)


def job_counts(connection: redis.Redis) -> dict[str, dict[str, int]]:
    """Jobs per queue: queued, running, failed, done (since the Redis was created)."""
    try:
        counts = {}
        for name in QUEUES:
            q = queue(connection, name)
            # no cleanup: RQ's would fail a dead worker's job outright; the workers' sweep retries it
            counts[name] = {"queued": q.count, "running": q.started_job_registry.get_job_count(cleanup=False),
                            "failed": q.failed_job_registry.count, "done": done_count(connection, name)}
        return counts
    except redis.RedisError as exc:
        log.warning("cannot read job counts from Redis: %s", exc)
        return {}


class BackgroundJobs:
    """What a web worker queues for the RQ workers. Without Redis, or when Redis fails, it says
    so in the log and queues nothing: a click never fails because background work could not start."""

    def __init__(self, connection: redis.Redis | None, loader, settings: Settings, metrics):
        self.connection = connection
        self.loader = loader
        self.settings = settings
        self.metrics = metrics

    def warm(self, urls: list[str]) -> int:
        return self._queue("warm", f"{len(urls)} embeddings", enqueue_warm, self.loader.model_id, urls,
                           self.settings.encode_batch_size)

    def prelabel(self, project_id: int, task_ids: list[int]) -> int:
        return self._queue("prelabel", f"{len(task_ids)} pre-label jobs", enqueue_prelabel,
                           self.loader.model_id, project_id, task_ids, self.settings.encode_batch_size)

    def train(self, project_id: int, trigger: str) -> str | None:
        """Queue a training run now (START_TRAINING), or count an annotation towards the next one."""
        if self.connection is None:
            log.info("not training project %s: training runs on workers and needs REDIS_URL", project_id)
            return None
        try:
            if trigger == "annotation":
                state = note_annotation(self.connection, project_id, self.settings.train_after_annotations,
                                        self.settings.train_timeout)
            else:
                state = enqueue_train(self.connection, project_id, self.settings.train_timeout)
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            log.warning("could not queue training for project %s: %s", project_id, exc)
            return None
        if state in ("queued", "requeued"):
            self.metrics.train_jobs.labels(trigger).inc()
        return state

    def warm_created(self, project_id: int, task_ids: list[int]) -> int:
        """New tasks (a TASKS_CREATED webhook): a job reads them from Label Studio, then embeds their images."""
        return self._queue("warm", f"a look-up of {len(task_ids)} new tasks", enqueue_created,
                           self.loader.model_id, project_id, task_ids)

    def warm_tasks(self, tasks: list[dict], config: ProjectConfig) -> int:
        """Queue the embedding of these tasks' images (new imports, batches without a project id)."""
        urls = []
        for task in tasks:
            try:
                urls.append(task_image_url(task, config))
            except BackendError as exc:
                log.warning("not warming task %s: %s", task.get("id"), exc.message)
        return self.warm(urls)

    def prefetch(self, project_id: int, task_id: int, count: int) -> int:
        return self._queue("warm", f"prefetch after task {task_id}", enqueue_prefetch,
                           self.loader.model_id, project_id, task_id, count)

    def _queue(self, kind: str, what: str, enqueue, *args) -> int:
        if self.connection is None:
            log.info("not queueing %s: background jobs need REDIS_URL and a worker", what)
            return 0
        try:
            queued = enqueue(self.connection, *args)
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            log.warning("could not queue %s: %s", what, exc)
            return 0
        counter = self.metrics.prelabel_jobs if kind == "prelabel" else self.metrics.warm_jobs
        counter.labels("queued").inc(queued)
        return queued


def enqueue_prefetch(connection: redis.Redis, model_id: str, project_id: int, task_id: int, count: int) -> int:
    state = enqueue_unique(connection, WARM_QUEUE, "backend.jobs.tasks.warm_next_tasks", (project_id, task_id, count),
                           f"next-{model_id}-{project_id}-{task_id}", f"embed the {count} tasks after task {task_id}")
    return int(state != "waiting")


@contextlib.contextmanager
def heartbeat(connection: redis.Redis | None):
    """Refresh this job's alive key while it runs (SimpleWorker sends no heartbeat of its own mid-job)."""
    job = get_current_job()
    if job is None or connection is None:
        yield
        return
    key, stop = _alive_key(job.id), threading.Event()
    connection.set(key, 1, ex=ALIVE_TTL)

    def beat():
        while not stop.wait(_BEAT_EVERY):
            try:
                connection.set(key, 1, ex=ALIVE_TTL)
            except redis.RedisError as exc:
                log.warning("heartbeat for %s failed: %s", job.id, exc)

    thread = threading.Thread(target=beat, name=f"beat-{job.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        connection.delete(key)


def new_annotations_reset(connection: redis.Redis, project_id: int) -> None:
    """A training run starts: it covers every annotation so far."""
    connection.set(_new_annotations_key(project_id), 0)


def count_done(connection: redis.Redis | None, queue_name: str, items: int = 1) -> None:
    """Finished job records expire (RECORD_TTL): keep a count for /metrics and progress (a batched job
    counts each image or task it finished)."""
    if connection is not None:
        connection.incr(f"sam-backend:done:{queue_name}", items)


def done_count(connection: redis.Redis, queue_name: str) -> int:
    return int(connection.get(f"sam-backend:done:{queue_name}") or 0)


def record_timings(connection: redis.Redis | None, queue_name: str, stages: dict[str, float]) -> None:
    """The last 1000 jobs' stage seconds (encode, everything, ...), for `bench prelabel` and capacity planning."""
    if connection is None:
        return
    key = f"sam-backend:timings:{queue_name}"
    connection.lpush(key, json.dumps(stages))
    connection.ltrim(key, 0, 999)


def recent_timings(connection: redis.Redis, queue_name: str) -> list[dict[str, float]]:
    return [json.loads(item) for item in connection.lrange(f"sam-backend:timings:{queue_name}", 0, -1)]


def record_training(connection: redis.Redis | None, project_id: int, summary: dict) -> None:
    if connection is not None:
        connection.set(f"sam-backend:train:last:{project_id}", json.dumps(summary), ex=30 * 24 * 3600)


def last_training(connection: redis.Redis, project_id: int) -> dict | None:
    raw = connection.get(f"sam-backend:train:last:{project_id}")
    return None if raw is None else json.loads(raw)
