"""The two roles of Redis (issue 11, finding 1): the job store never loses a queued job or record,
however full the embedding cache gets. Run against the Redis servers `sam-backend serve` starts
and those docker-compose.yml starts (their own command lines), with 400 warm jobs queued the way
the web app queues them and embedding-sized writes through the services' own EmbeddingCache."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from backend.jobs import queues
from backend.pipeline.embeddings import Embedding
from backend.services import Services
from backend.settings import Settings
from backend.web.embedded_redis import EmbeddedRedis, redis_binary, start_embedded
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
JOBS = 400
WRITES = 60  # each an embedding (~1-2 MB compressed), its image copy and its URL digest: > 70 MB


class CommandLineRedis:
    """redis-server with a command line from docker-compose.yml, on a free loopback port, stopped by PID."""

    def __init__(self, command: str, workdir: Path, env: dict[str, str]):
        command = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), command)
        argv = shlex.split(command)
        assert argv[0] == "redis-server"
        workdir.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen([redis_binary(), *argv[1:], "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.proc.poll() is None, f"redis-server refused {command!r}"
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def services_for(tiny_checkpoint, tmp_path: Path, redis_url: str, cache_url: str | None) -> Services:
    return Services.build(Settings(sam_checkpoint=str(tiny_checkpoint), device="cpu", redis_url=redis_url,
                                   cache_redis_url=cache_url, model_dir=tmp_path / "models", torch_threads=1))


def queue_and_flood(services: Services) -> None:
    """400 warm jobs queued as a webhook queues them, then the cache writes of 60 encodes."""
    assert services.background.warm([f"/data/upload/{i}.png" for i in range(JOBS)]) == JOBS
    assert queues.queue(services.redis).count == JOBS
    rng = np.random.default_rng(0)
    features = rng.standard_normal((256, 64, 64)).astype(np.float32)
    image = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    for i in range(WRITES):
        digest = f"{i:064x}"
        features[0, 0, 0] = i  # a different embedding each time
        services.cache.put(services.cache.key(services.loader.model_id, digest),
                           Embedding.quantized(features, (768, 1024), (768, 1024)))
        services.cache.put_image(digest, image)
        services.cache.remember_url(f"http://images.example/{i}.jpg", digest)


def assert_no_job_lost(services: Services, cache_url: str) -> None:
    jobs_db, cache_db = services.redis, redis.Redis.from_url(cache_url)
    assert queues.queue(jobs_db).count == JOBS  # every queued job is still there
    assert len(jobs_db.keys("rq:job:*")) == JOBS  # and every job record
    assert jobs_db.keys("sam-backend:emb:*") == [] and jobs_db.keys("sam-backend:img:*") == []  # no cache in the store
    embeddings = len(cache_db.keys("sam-backend:emb:*"))
    assert 0 < embeddings < WRITES  # the cache evicted the oldest embeddings instead
    assert services.metrics.registry.get_sample_value("sam_redis_errors_total") == 0  # no cache write failed
    assert queues.store_risks(jobs_db, shares_cache=False) == []


def test_the_embedded_redis_servers_evict_embeddings_and_no_queued_job(tiny_checkpoint, tmp_path):
    # as `sam-backend serve` starts them (REDIS_URL unset), with a 40 MB EMBEDDED_REDIS_MAXMEMORY
    store, cache = start_embedded(tmp_path / "redis", "40mb")
    try:
        services = services_for(tiny_checkpoint, tmp_path, store.url, cache.url)
        assert services.cache.client is not services.redis
        queue_and_flood(services)
        assert_no_job_lost(services, cache.url)
    finally:
        store.stop()
        cache.stop()


def test_the_compose_redis_servers_evict_embeddings_and_no_queued_job(tiny_checkpoint, tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["backend"]["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0" and env["CACHE_REDIS_URL"] == "redis://redis-cache:6379/0"
    store = CommandLineRedis(compose["services"]["redis"]["command"], tmp_path / "jobs", {})
    cache = CommandLineRedis(compose["services"]["redis-cache"]["command"], tmp_path / "cache",
                             {"REDIS_MAXMEMORY": "40mb"})
    try:
        assert redis.Redis.from_url(cache.url).config_get("maxmemory")["maxmemory"] == str(40 * 1024 * 1024)
        services = services_for(tiny_checkpoint, tmp_path, store.url, cache.url)
        queue_and_flood(services)
        assert_no_job_lost(services, cache.url)
    finally:
        store.stop()
        cache.stop()


def test_one_lru_redis_for_both_roles_loses_queued_jobs_and_is_reported(tiny_checkpoint, tmp_path, caplog):
    # the old set-up (one allkeys-lru Redis for jobs and embeddings): the same flood evicts queued
    # jobs, which is what the two tests above would catch; the backend warns about it at start
    single = EmbeddedRedis(tmp_path / "one", maxmemory="40mb", name="both").start()
    try:
        services = services_for(tiny_checkpoint, tmp_path, single.url, None)
        assert services.cache.client is services.redis
        assert "maxmemory-policy allkeys-lru: queued jobs and job records can be evicted" in caplog.text
        risks = queues.store_risks(services.redis, shares_cache=True)
        assert len(risks) == 1 and "allkeys-lru" in risks[0] and "CACHE_REDIS_URL" in risks[0]
        queue_and_flood(services)
        assert len(services.redis.keys("rq:job:*")) < JOBS
    finally:
        single.stop()


@pytest.mark.parametrize("policy, shares, expected", [
    ("volatile-lru", True, "EMBEDDING_TTL=0"),
    ("volatile-lru", False, "finished-job records and heartbeats carry a TTL"),
    ("noeviction", True, "cache writes and job enqueues fail"),
])
def test_other_risky_job_stores_are_reported(tmp_path, policy, shares, expected):
    server = CommandLineRedis(f"redis-server --maxmemory 40mb --maxmemory-policy {policy} --save '' --appendonly no",
                              tmp_path / "r", {})
    try:
        risks = queues.store_risks(redis.Redis.from_url(server.url), shares_cache=shares)
        assert any(expected in risk for risk in risks), risks
        assert any("does not persist" in risk for risk in risks)  # no save points, no append-only file
    finally:
        server.stop()


def test_the_embedded_job_store_keeps_its_queue_through_a_crash_and_an_upgrade(tiny_checkpoint, tmp_path):
    data = tmp_path / "redis"
    # a job store written by an earlier version: snapshots only, no append-only file yet
    old = EmbeddedRedis(data, maxmemory=None, name="jobs")
    old.data_dir.mkdir(parents=True)
    proc = subprocess.Popen([redis_binary(), "--port", "0", "--unixsocket", str(old.socket), "--dir", str(data),
                             "--dbfilename", "jobs.rdb", "--save", "60 1"], stdout=subprocess.DEVNULL)
    client = redis.Redis.from_url(old.url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    queues.enqueue_warm(client, "vit_b-old", ["/data/upload/old.png"])
    os.kill(proc.pid, signal.SIGTERM)  # a clean stop writes the snapshot
    proc.wait(timeout=30)

    store = EmbeddedRedis(data, maxmemory=None, name="jobs").start()
    try:
        services = services_for(tiny_checkpoint, tmp_path, store.url, None)
        assert queues.queue(services.redis).count == 1  # the upgrade kept the old queue
        assert services.background.warm([f"/data/upload/{i}.png" for i in range(JOBS)]) == JOBS
        os.kill(store.proc.pid, signal.SIGKILL)  # a crash: no snapshot written
        store.proc.wait(timeout=30)
        store.start()
        assert queues.queue(redis.Redis.from_url(store.url)).count == JOBS + 1  # every write was on disk
    finally:
        store.stop()


def test_a_cache_redis_alone_caches_embeddings_and_the_embedded_start_keeps_it(tiny_checkpoint, tmp_path):
    # CACHE_REDIS_URL set, REDIS_URL unset: clicks use the shared cache (no background jobs), and
    # `serve` starts only the embedded job store instead of replacing the admin's cache
    started = start_embedded(tmp_path / "redis", "40mb", cache=False)
    try:
        assert len(started) == 1 and not (tmp_path / "redis" / "embeddings.sock").exists()
        services = services_for(tiny_checkpoint, tmp_path, None, started[0].url)
        assert services.redis is None and services.cache.client is not None
        services.cache.remember_url("http://images.example/a.jpg", "ab" * 32)
        assert redis.Redis.from_url(started[0].url).keys("sam-backend:url:*")
    finally:
        started[0].stop()
