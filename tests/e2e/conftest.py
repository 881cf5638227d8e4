"""A real Label Studio 1.23.2 (own virtualenv, SQLite, 127.0.0.1) and our backend under gunicorn."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from backend.web.server import stop_process
from tests.conftest import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", ROOT / ".ls-venv"))
LS_VERSION = "1.23.2"
ADMIN_TOKEN = "e2eadmintoken0123456789abcdef0123456789"
BASIC_USER, BASIC_PASS = "labelstudio", "e2e-basic-pass"


def ensure_label_studio() -> Path:
    """Label Studio in its own venv so its pins never fight ours; installed once (about 2 minutes)."""
    exe = LS_VENV / "bin" / "label-studio"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(LS_VENV)], check=True)
    subprocess.run([str(LS_VENV / "bin" / "pip"), "install", "-q", f"label-studio=={LS_VERSION}"], check=True)
    return exe


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass  # still starting: poll until the deadline
        time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    stop_process(proc, grace=30, group=True)


class LabelStudioServer:
    def __init__(self, workdir: Path):
        exe = ensure_label_studio()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files_root = workdir / "files"
        self.files_root.mkdir()
        self.token = ADMIN_TOKEN
        env = dict(
            os.environ,
            LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
            LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.files_root),
            SENTRY_DSN="",
            DJANGO_DB="sqlite",
        )
        self.log = open(workdir / "label-studio.log", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(self.port),
             "--data-dir", str(workdir / "data"), "--username", "admin@example.com", "--password", "e2e-admin-pass",
             "--user-token", ADMIN_TOKEN, "--enable-legacy-api-token"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(self.url + "/health", self.proc, 300, "Label Studio")
        self.start_seconds = time.monotonic() - self.started

    def api(self, method: str, path: str, auth: str | None = None, **kwargs) -> requests.Response:
        """Label Studio's API as the admin (legacy token), or with `auth` ("" sends no credentials)."""
        auth = f"Token {self.token}" if auth is None else auth
        headers = {"Authorization": auth} if auth else {}
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


class BackendServer:
    def __init__(self, workdir: Path, checkpoint: Path, redis_url: str, ls_url: str, api_key: str,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items()}
        self.env.update(
            SAM_CHECKPOINT=str(checkpoint), REDIS_URL=redis_url, LABEL_STUDIO_URL=ls_url,
            LABEL_STUDIO_API_KEY=api_key, BASIC_AUTH_USER=BASIC_USER, BASIC_AUTH_PASS=BASIC_PASS,
            MODEL_DIR=str(workdir), DEVICE="cpu", TORCH_THREADS="1", PORT=str(self.port), LOG_LEVEL="INFO",
            # the random test SAM draws speckled masks on tiny images: keep every part as a polygon
            POLYGON_MIN_AREA="0",
            PRELABEL_POINTS_PER_SIDE="4",  # segment everything with 16 prompts: seconds, not minutes
            TRAIN_STEPS="15", TRAIN_MIN_CORRECTIONS="2", HEAD_RELOAD_SECONDS="0",  # a training run in seconds
        )
        self.env.update(env or {})
        self.log = open(workdir / f"backend-{self.port}.log", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend.commands.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(self.url + "/health", self.proc, 120, "sam-backend")

    def worker(self, *args: str) -> subprocess.Popen:
        """A `sam-backend worker` process with this backend's settings (any number may run at once)."""
        return subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "worker", *args], cwd=ROOT, env=self.env,
                                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.cli_with({}, *args)

    def cli_with(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        """A `sam-backend` command with this backend's settings, some of them changed. The bound is for a
        hung command, not a speed check: a training run took 76 s on a loaded 2-core machine."""
        return subprocess.run([sys.executable, "-m", "backend.commands.cli", *args], cwd=ROOT,
                              env={**self.env, **env}, capture_output=True, text=True, timeout=400)

    def model_version(self) -> str:
        return requests.get(self.url + "/health", timeout=10).json()["model_version"]

    def metric(self, name: str) -> float:
        total = 0.0
        for line in requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


TIMINGS: dict[str, float] = {}
# lines the browser tests measured (payload bytes, answer-to-visible times), printed at the end of the run
PAGE_FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line(
            "e2e timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in TIMINGS.items())
        )
    for line in PAGE_FIGURES:
        terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item: the browser fixtures take screenshots when the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    TIMINGS["Label Studio start"] = server.start_seconds
    yield server
    server.stop()


@pytest.fixture(scope="module")
def e2e_redis(tmp_path_factory):
    """Redis of its own: the backend's embedding worker must not take other tests' queued jobs."""
    server = RedisServer(tmp_path_factory.mktemp("e2e-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(label_studio, tiny_checkpoint, e2e_redis, tmp_path_factory):
    server = BackendServer(tmp_path_factory.mktemp("backend"), tiny_checkpoint, e2e_redis.url,
                           label_studio.url, label_studio.token)
    TIMINGS["backend start"] = time.monotonic() - server.started
    yield server
    server.stop()
