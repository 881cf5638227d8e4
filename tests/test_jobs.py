"""RQ jobs with a real Redis and real workers: one job per image, failures and dead workers retried."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from backend.jobs import queues as jobs
from backend.pipeline.model_loader import ModelLoader
from tests.conftest import TOKEN, make_image, work_queues

ROOT = Path(__file__).resolve().parents[1]


def test_a_job_is_queued_once_while_it_waits(redis_url):
    conn = redis.Redis.from_url(redis_url)
    args = (jobs.WARM_QUEUE, "backend.jobs.tasks.warm_image", ("/data/x.png",), "warm-test-1", "embed x")
    assert jobs.enqueue_unique(conn, *args) == "queued"
    assert jobs.enqueue_unique(conn, *args) == "waiting"
    assert jobs.queue(conn).count == 1
    job = Job.fetch("warm-test-1", connection=conn, serializer=JSONSerializer)
    assert job.args == ["/data/x.png"]
    stored = json.loads(zlib.decompress(conn.hget(job.key, "data")))  # plain JSON: nothing to unpickle
    assert stored[0] == "backend.jobs.tasks.warm_image" and stored[2] == ["/data/x.png"]


def test_a_failed_job_is_replaced_on_the_next_request(settings, image_server):
    conn = redis.Redis.from_url(settings.redis_url)
    model_id = ModelLoader(settings).model_id
    assert jobs.enqueue_warm(conn, model_id, ["/data/upload/missing.png"]) == 1
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0
    job = Job.fetch(jobs.warm_job_id(model_id, "/data/upload/missing.png"), connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert "404" in job.latest_result().exc_string
    image_server.add("/data/upload/missing.png", make_image(40, 30))  # the file appears
    assert jobs.enqueue_warm(conn, model_id, ["/data/upload/missing.png"]) == 1
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0
    assert len(conn.keys("sam-backend:emb:*")) == 1


def test_followers_tell_done_from_gone(settings, image_server):
    # a finished job keeps a short record; one with no record at all was lost (Redis flushed or
    # evicted it) and is reported, where it used to count as done
    from backend.jobs.follow import follow_jobs

    conn = redis.Redis.from_url(settings.redis_url)
    model_id = ModelLoader(settings).model_id
    url = image_server.add("/data/upload/quick.png", make_image(40, 30))
    assert jobs.enqueue_warm(conn, model_id, [url]) == 1
    job_id = jobs.warm_job_id(model_id, url)
    snapshot = jobs.fetch_job(conn, job_id)
    assert snapshot.get_status(refresh=False) == JobStatus.QUEUED
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0
    assert not jobs.abandoned(conn, snapshot)  # reads the snapshot
    assert jobs.fetch_job(conn, job_id).get_status(refresh=False) == JobStatus.FINISHED
    assert follow_jobs(conn, jobs.WARM_QUEUE, {job_id: "a.png"}, "embedding", io.StringIO(), poll=0.1) == {}
    conn.delete(f"rq:job:{job_id}")  # what a flushed Redis leaves
    out = io.StringIO()
    failures = follow_jobs(conn, jobs.WARM_QUEUE, {job_id: "a.png"}, "embedding", out, poll=0.1)
    assert failures["a.png"].startswith("lost")
    assert "1 of 1 jobs vanished from Redis without a record of finishing: 0 queued again, 1 lost" in out.getvalue()
    assert jobs.enqueue_warm(conn, model_id, [url]) == 1  # done jobs do not block a new request


def test_a_follower_queues_a_job_again_when_its_record_vanishes_while_queued(settings, image_server):
    # what an evicting Redis did to a queued job (issue 11, finding 1): the record and its place in
    # the queue gone. The follower read the job before, so it knows how to queue it again.
    from backend.jobs.follow import follow_jobs

    conn = redis.Redis.from_url(settings.redis_url)
    model_id = ModelLoader(settings).model_id
    url = image_server.add("/data/upload/evicted.png", make_image(40, 30))
    assert jobs.enqueue_warm(conn, model_id, [url]) == 1
    job_id = jobs.warm_job_id(model_id, url)
    rounds = []

    def while_queued(job, bar):
        rounds.append(job.get_status(refresh=False))
        if len(rounds) == 1:  # evicted after the follower's first look
            conn.delete(job.key)
            conn.lrem(jobs.queue(conn).key, 0, job_id)
            assert jobs.queue(conn).count == 0
        else:  # queued again by the follower: a worker takes it
            assert jobs.queue(conn).count == 1
            assert work_queues(settings, [jobs.WARM_QUEUE]) == 0

    out = io.StringIO()
    failures = follow_jobs(conn, jobs.WARM_QUEUE, {job_id: "evicted.png"}, "embedding", out,
                           on_running=while_queued, poll=0.05)
    assert failures == {} and rounds == [JobStatus.QUEUED, JobStatus.QUEUED]
    assert "evicted.png: its job record vanished from Redis before it finished; queued again" in out.getvalue()
    assert "1 queued again, 0 lost" in out.getvalue()
    assert jobs.fetch_job(conn, job_id).get_status(refresh=False) == JobStatus.FINISHED
    assert len(conn.keys("sam-backend:emb:*")) == 1


def test_a_job_lost_again_and_again_is_reported_lost_after_the_retries(settings, image_server):
    from backend.jobs.follow import follow_jobs

    conn = redis.Redis.from_url(settings.redis_url)
    model_id = ModelLoader(settings).model_id
    url = image_server.add("/data/upload/cursed.png", make_image(40, 30))
    assert jobs.enqueue_warm(conn, model_id, [url]) == 1
    job_id = jobs.warm_job_id(model_id, url)
    evictions = []

    def evict(job, bar):
        evictions.append(job.id)
        conn.delete(job.key)
        conn.lrem(jobs.queue(conn).key, 0, job_id)

    out = io.StringIO()
    failures = follow_jobs(conn, jobs.WARM_QUEUE, {job_id: "cursed.png"}, "embedding", out, on_running=evict,
                           poll=0.05, max_retries=2)
    assert len(evictions) == 3  # the first time and after each of the two retries
    assert failures["cursed.png"].startswith("lost") and "queued again 2 times" in failures["cursed.png"]
    assert "0 queued again, 1 lost" in out.getvalue()


def _start_job_and_kill_its_worker(settings, conn, url: str, tmp_path) -> str:
    env = dict(os.environ, SAM_CHECKPOINT=settings.sam_checkpoint, REDIS_URL=settings.redis_url,
               LABEL_STUDIO_URL=settings.label_studio_url, LABEL_STUDIO_API_KEY=TOKEN,
               MODEL_DIR=str(tmp_path / "models"), DEVICE="cpu", TORCH_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "worker", "--queues", jobs.WARM_QUEUE],
                              cwd=ROOT, env=env)
    model_id = ModelLoader(settings).model_id
    job_id = jobs.warm_job_id(model_id, url)
    try:
        assert jobs.enqueue_warm(conn, model_id, [url]) == 1
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
            if job.get_status(refresh=False) == JobStatus.STARTED and conn.exists(f"sam-backend:alive:{job_id}"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the worker never started the job")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    # right after the kill the job still looks alive: asking again adds nothing
    assert jobs.enqueue_warm(conn, model_id, [url]) == 0
    return job_id


def test_a_killed_workers_job_is_finished_by_another_worker_without_anyone_asking(settings, image_server, tmp_path):
    conn = redis.Redis.from_url(settings.redis_url)
    url = image_server.add("/data/upload/slow.png", make_image(48, 36))
    image_server.delays[url] = 120  # the download hangs: the job is mid-way when the worker dies
    job_id = _start_job_and_kill_its_worker(settings, conn, url, tmp_path)
    image_server.delays.clear()
    env = dict(os.environ, SAM_CHECKPOINT=settings.sam_checkpoint, REDIS_URL=settings.redis_url,
               LABEL_STUDIO_URL=settings.label_studio_url, LABEL_STUDIO_API_KEY=TOKEN,
               MODEL_DIR=str(tmp_path / "models"), DEVICE="cpu", TORCH_THREADS="1")
    second = subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "worker", "--queues", jobs.WARM_QUEUE],
                              cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + jobs.ALIVE_TTL + 90
        while time.monotonic() < deadline and jobs.fetch_job(conn, job_id).get_status(refresh=False) != JobStatus.FINISHED:
            time.sleep(0.5)
        job = jobs.fetch_job(conn, job_id)  # nobody re-ran anything
        assert job.get_status(refresh=False) == JobStatus.FINISHED and job.get_meta(refresh=False)["retries"] == 1
        assert len(conn.keys("sam-backend:emb:*")) == 1
    finally:
        second.terminate()
        second.wait(timeout=60)


def test_a_job_whose_workers_keep_dying_fails_saying_why(settings, image_server, tmp_path):
    from backend.jobs.follow import follow_jobs

    conn = redis.Redis.from_url(settings.redis_url)
    url = image_server.add("/data/upload/hang.png", make_image(48, 36))
    image_server.delays[url] = 120
    job_id = _start_job_and_kill_its_worker(settings, conn, url, tmp_path)
    image_server.delays.clear()
    time.sleep(jobs.ALIVE_TTL + 1)
    assert jobs.requeue_abandoned(conn, [jobs.WARM_QUEUE], max_retries=0) == {job_id: "failed"}
    failures = follow_jobs(conn, jobs.WARM_QUEUE, {job_id: "hang.png"}, "embedding", io.StringIO(), poll=0.1)
    assert "worker died 1 times" in failures["hang.png"]
    assert jobs.queue(conn).failed_job_registry.count == 1 and jobs.queue(conn).started_job_registry.count == 0


def test_a_worker_starting_long_after_every_worker_died_retries_the_job_rqs_cleanup_would_fail(
        settings, image_server, tmp_path):
    # RQ's own start-up maintenance fails a started job outright once its registry entry expired
    # (job timeout + 60 s after the last worker died); the worker sweeps before that runs
    conn = redis.Redis.from_url(settings.redis_url)
    url = image_server.add("/data/upload/late.png", make_image(48, 36))
    image_server.delays[url] = 120
    job_id = _start_job_and_kill_its_worker(settings, conn, url, tmp_path)
    image_server.delays.clear()
    # a fake for half an hour passing (a wait we cannot afford in a test): the heartbeat expired,
    # the job started 31 minutes ago and RQ's registry entry for it is past its expiry
    conn.delete(f"sam-backend:alive:{job_id}")
    conn.hset(f"rq:job:{job_id}", "started_at", utcformat(datetime.now(timezone.utc) - timedelta(minutes=31)))
    registry = jobs.queue(conn).started_job_registry
    for entry in conn.zrange(registry.key, 0, -1):
        conn.zadd(registry.key, {entry: time.time() - 60})
    assert jobs.abandoned(conn, jobs.fetch_job(conn, job_id))
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0
    job = jobs.fetch_job(conn, job_id)
    assert job.get_status(refresh=False) == JobStatus.FINISHED and job.get_meta(refresh=False)["retries"] == 1
    assert jobs.queue(conn).failed_job_registry.count == 0


def test_metrics_show_job_counts_per_queue(settings, make_client, image_server):
    c, services = make_client(settings)
    conn = redis.Redis.from_url(settings.redis_url)
    image_server.add("/data/upload/a.png", make_image(40, 30))
    jobs.enqueue_warm(conn, services.loader.model_id, ["/data/upload/a.png", "/data/upload/gone.png"])

    def gauge(queue: str, state: str) -> float:
        line = f'sam_jobs{{queue="{queue}",state="{state}"}} '
        return next(float(l.split(" ")[-1]) for l in c.get("/metrics").data.decode().splitlines() if l.startswith(line))

    assert gauge("sam-warm", "queued") == 2 and gauge("sam-warm", "done") == 0
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0
    assert gauge("sam-warm", "queued") == 0
    assert gauge("sam-warm", "done") == 1 and gauge("sam-warm", "failed") == 1
    assert gauge("sam-prelabel", "queued") == 0


def test_worker_keeps_the_services_short_redis_timeout(settings):
    # RQ raises its connection's socket timeout to ~7 min; on the services' client that made every
    # cache call and heartbeat of a worker hang that long on a dead Redis
    from backend.jobs.worker import build_worker
    from backend.services import Services

    services = Services.build(settings)
    worker = build_worker(services, [jobs.WARM_QUEUE])
    assert services.redis.connection_pool.connection_kwargs["socket_timeout"] == 2.0
    assert worker.connection.connection_pool.connection_kwargs["socket_timeout"] > 60


def test_worker_exit_code_is_non_zero_when_rq_quits_on_an_error(settings, monkeypatch):
    # a fake for a fault we cannot cause on cue: Redis refusing a command inside RQ's loop (RQ logs
    # it and returns as if done, and `sam-backend worker` used to exit 0 so nothing restarted it)
    import redis as redis_module
    from rq.queue import Queue

    def refused(*args, **kwargs):
        raise redis_module.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0  # empty queues, burst: a clean stop
    monkeypatch.setattr(Queue, "dequeue_any", classmethod(lambda cls, *a, **k: refused()))
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 1


def test_segment_everything_drafts_carry_plain_sams_version_and_job_ids_ignore_heads(settings, image_server):
    # a head refines box prompts only: stamping everything-drafts with it made every promotion
    # re-draft identical tasks
    from backend.labelstudio.label_config import parse_label_config
    from backend.services import Services
    from tests.conftest import protocol_body

    services = Services.build(settings)
    body = protocol_body("predict_batch.json")
    config = parse_label_config(body["label_config"])
    plain, boxed = {"id": 1, "data": {}}, {"id": 2, "data": {}, "predictions": [{"result": [{
        "type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": 80,
        "original_height": 60, "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["Object"]}}]}]}

    class Head:  # what the registry serves: only its version suffix matters to the version
        model_version_suffix = "+head-p5-v0001"

    services.heads.for_project = lambda project: Head() if project == 5 else None
    assert services.predictor.draft_version(plain, config, 5) == services.loader.model_version
    assert services.predictor.draft_version(boxed, config, 5) == services.loader.model_version + "+head-p5-v0001"
    assert jobs.prelabel_job_id(services.loader.model_id, 7) == f"prelabel-{services.loader.model_id}-7"


def test_a_batched_warm_job_caches_every_image_and_a_bad_one_fails_alone(settings, image_server):
    """ENCODE_BATCH_SIZE=3: one job holds three images, encoded in one forward pass by a real RQ worker;
    the image that cannot be decoded fails alone, named with its reason, and the other two are cached
    under their own keys, equal to what a one-image job stores."""
    from backend.jobs.follow import failure_line
    from backend.pipeline.embeddings import EmbeddingCache, content_digest, deserialize

    batched = settings.replace(encode_batch_size=3)
    conn = redis.Redis.from_url(settings.redis_url)
    model_id = ModelLoader(batched).model_id
    good = {"/data/upload/b1.png": make_image(40, 30, seed=1), "/data/upload/b2.png": make_image(30, 44, seed=2)}
    for path, data in good.items():
        image_server.add(path, data)
    image_server.add("/data/upload/broken.png", b"these bytes are not an image")
    urls = ["/data/upload/b1.png", "/data/upload/broken.png", "/data/upload/b2.png"]
    [(job_id, chunk)] = jobs.warm_batches(model_id, urls, 3)
    assert chunk == urls
    assert jobs.enqueue_warm(conn, model_id, urls, batch=3) == 3
    assert jobs.queue(conn).job_ids == [job_id]  # one job for the three
    assert work_queues(batched, [jobs.WARM_QUEUE]) == 0
    job = jobs.fetch_job(conn, job_id)
    assert job.get_status(refresh=False) == JobStatus.FAILED
    assert list(job.get_meta(refresh=False)["failed_items"]) == ["/data/upload/broken.png"]
    line = failure_line(job)
    assert "1 of 3 failed" in line and "broken.png" in line and "b1.png" not in line
    keys = {EmbeddingCache.key(model_id, content_digest(data)) for data in good.values()}
    assert {k.decode() for k in conn.keys("sam-backend:emb:*")} == keys
    assert jobs.done_count(conn, jobs.WARM_QUEUE) == 2
    # the same images one job each: the stored entries are the batched ones (same bytes after decoding)
    batched_entries = {k: deserialize(conn.get(k)) for k in keys}
    conn.delete(*keys)
    assert jobs.enqueue_warm(conn, model_id, list(good)) == 2
    assert work_queues(settings, [jobs.WARM_QUEUE]) == 0
    for key, entry in batched_entries.items():
        alone = deserialize(conn.get(key))
        assert alone.original_size == entry.original_size
        assert np.abs(alone.features.astype(np.float32) - entry.features.astype(np.float32)).max() <= 1e-2
    # a new request queues the batch again, and only the bad image is encoded again (the rest are hits)
    image_server.add("/data/upload/broken.png", make_image(36, 36, seed=3))
    assert jobs.enqueue_warm(conn, model_id, urls, batch=3) == 3
    assert work_queues(batched, [jobs.WARM_QUEUE]) == 0
    assert jobs.fetch_job(conn, job_id).get_status(refresh=False) == JobStatus.FINISHED
    assert len(conn.keys("sam-backend:emb:*")) == 3
