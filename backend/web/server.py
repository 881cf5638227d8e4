"""`sam-backend serve`: checkpoint ready, Redis ready (embedded if REDIS_URL is unset), then gunicorn.

gunicorn runs in this process (not exec'd) so the embedded Redis is stopped when it exits.
Workers import the app after the fork: torch and CUDA are never initialised in the parent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from gunicorn.app.base import BaseApplication

from backend.web.embedded_redis import start_embedded
from backend.settings import Settings
from model.checkpoints import CheckpointError, resolve_checkpoint

log = logging.getLogger(__name__)


class GunicornApp(BaseApplication):
    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorn releases lack some settings
                self.cfg.set(key, value)

    def load(self):
        from backend.web.wsgi import app

        return app


def gunicorn_options(settings: Settings) -> dict:
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        "threads": settings.threads,
        # gthread, but a request reaches a thread only once it has arrived whole: a client trickling
        # its body holds no thread (backend/web/buffered_worker.py)
        "worker_class": "backend.web.buffered_worker.BufferingThreadWorker",
        # Label Studio reuses a connection after 1-3 s idle; gunicorn's default keep-alive (2 s) closed
        # it under the client's feet and the click was lost (Label Studio does not retry a POST)
        "keepalive": 75,
        # a cold click encodes the image: ~25 s for vit_b on a CPU, minutes for vit_h
        "timeout": 600,
        "graceful_timeout": 30,
        "loglevel": settings.log_level.lower(),
        # gunicorn >= 25 opens a control socket at a fixed path: two servers on one host would fight over it
        "control_socket_disable": True,
        "accesslog": "-" if settings.log_level in ("DEBUG", "INFO") else None,
    }


def web_torch_threads(settings: Settings, cpus: int | None = None) -> int:
    """torch / ONNX Runtime threads per web worker: TORCH_THREADS, or the cores divided among the
    worker processes. The libraries' default is every core in every process: with two workers on
    two cores, two clicks at once ran four busy threads on two cores and every click waited."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (cpus or os.cpu_count() or 1) // settings.workers)


def serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = resolve_checkpoint(settings.sam_model_type, settings.sam_checkpoint, settings.model_dir)
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    os.environ["SAM_CHECKPOINT"] = str(path)
    # workers read their settings from the environment: hand them the command line's choices
    os.environ["HOST"], os.environ["PORT"] = settings.host, str(settings.port)
    os.environ["MODEL_DIR"] = str(settings.model_dir)

    embedded: tuple = ()
    if not settings.redis_url:  # two servers, one per role of Redis (see backend/web/embedded_redis.py)
        embedded = start_embedded(settings.model_dir / "redis", settings.embedded_redis_maxmemory,
                                  cache=not settings.cache_redis_url)
        os.environ["REDIS_URL"] = embedded[0].url
        if len(embedded) > 1:
            os.environ["CACHE_REDIS_URL"] = embedded[1].url
    # encoders run in RQ workers, not in the processes answering clicks
    workers = [
        subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "worker"], env=os.environ.copy())
        for _ in range(settings.warm_workers)
    ]
    # after the RQ workers have their environment: they encode alone and keep every core
    os.environ["TORCH_THREADS"] = str(web_torch_threads(settings))
    try:
        log.info("serving SAM on http://%s:%d (%d workers x %d threads, %s torch threads each, %d embedding "
                 "workers)", settings.host, settings.port, settings.workers, settings.threads,
                 os.environ["TORCH_THREADS"], len(workers))
        GunicornApp(gunicorn_options(settings)).run()
    finally:
        for worker in workers:
            stop_process(worker)
        for instance in embedded:
            instance.stop()
    return 0


def stop_process(proc: subprocess.Popen, grace: float = 15.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; `group`: the whole process group it leads."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
