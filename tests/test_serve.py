"""`sam-backend serve` as an admin runs it: gunicorn workers, embedded Redis, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

from backend.settings import Settings

from tests.conftest import TOKEN, free_port, make_image, protocol_body

ROOT = Path(__file__).resolve().parents[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited with {proc.returncode}"
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except requests.RequestException:  # not listening yet, or a worker still importing torch
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def test_serve_with_embedded_redis_answers_clicks_from_two_workers(tiny_checkpoint, image_server, tmp_path):
    image_server.add("/data/local-files/?d=local/img_local.png", make_image(80, 60))
    port = free_port()
    model_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(SAM_CHECKPOINT=str(tiny_checkpoint), MODEL_DIR=str(model_dir), LABEL_STUDIO_URL=image_server.url,
               LABEL_STUDIO_API_KEY=TOKEN, DEVICE="cpu", TORCH_THREADS="1", LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.commands.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        cwd=ROOT, env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_for(base + "/health", proc).json()
        assert health["status"] == "UP" and health["model_version"].startswith("sam-custom32x2-")
        socket_path = model_dir / "redis" / "embeddings.sock"  # the cache; jobs.sock is the job store
        assert socket_path.exists() and (model_dir / "redis" / "jobs.sock").exists()
        store = redis.Redis(unix_socket_path=str(socket_path))
        # a batch predict (no project id here: an embedding job, not a pre-label one) queues the image;
        # the worker `serve` started embeds it
        batch = protocol_body("predict_batch.json")
        batch["tasks"] = batch["tasks"][:1]
        del batch["project"]
        assert requests.post(base + "/predict", json=batch, timeout=30).status_code == 200
        deadline = time.monotonic() + 120
        while not store.keys("sam-backend:emb:*") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(store.keys("sam-backend:emb:*")) == 1
        body = protocol_body("predict_interactive_keypointlabels.json")
        answers = [requests.post(base + "/predict", json=body, timeout=120) for _ in range(4)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert all(a.json()["results"][0]["result"] for a in answers)
        # both workers share one embedded Redis: still one embedding, nobody encoded it again
        assert len(store.keys("sam-backend:emb:*")) == 1
        encoded = sum(
            float(line.rsplit(" ", 1)[1])
            for _ in range(4)
            for line in requests.get(base + "/metrics", timeout=10).text.splitlines()
            if line.startswith("sam_encoder_seconds_count")
        )
        assert encoded == 0  # whichever gunicorn worker answered /metrics never ran the encoder
        # a client reusing its connection after 1-3 s idle, as Label Studio's does: the server keeps
        # it open (with gunicorn's default 2 s keep-alive it was closed and the click was lost)
        session = requests.Session()
        for idle in (1.0, 2.5, 3.0):
            assert session.post(base + "/predict", json=body, timeout=60).status_code == 200
            time.sleep(idle)
        assert session.post(base + "/predict", json=body, timeout=60).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    # both embedded Redis servers went down with the server
    time.sleep(0.5)
    for path in (socket_path, model_dir / "redis" / "jobs.sock"):
        try:
            redis.Redis(unix_socket_path=str(path), socket_connect_timeout=1).ping()
            still_up = True
        except redis.ConnectionError:
            still_up = False
        assert not still_up, path


def test_serve_without_a_checkpoint_offline_says_where_to_put_it(tmp_path):
    env = dict(os.environ, SAM_CHECKPOINT=str(tmp_path / "missing.pth"), MODEL_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "backend.commands.cli", "serve", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert str(tmp_path / "missing.pth") in result.stderr


def test_bad_setting_is_refused_at_start(tmp_path):
    env = dict(os.environ, SAM_MODEL_TYPE="vit_x", MODEL_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "backend.commands.cli", "serve"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "SAM_MODEL_TYPE" in result.stderr


def test_bench_click_prints_a_table_and_a_json_last_line(tiny_checkpoint):
    """The benchmark runs end to end (here with the small SAM, so it is quick); figures are not judged."""
    import json

    env = dict(os.environ, SAM_CHECKPOINT=str(tiny_checkpoint), TORCH_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "backend.commands.cli", "bench", "click", "--sizes", "1MP", "--cold", "1", "--warm", "2",
         "--device", "cpu", "--head"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    row = figures["sizes"]["1MP"]
    assert row["cold_ms"]["n"] == 1
    for output in ("brush", "polygon"):
        assert row[output]["warm_ms"]["n"] == 2
        assert row[output]["response_bytes_p50"] > 0
        assert row[output]["head_warm_ms"]["n"] == 2 and row[output]["head_stage_ms_p50"] > 0  # the head ran
    assert figures["embedding_bytes"]["n"] == 2  # the warm-up image and the cold one (read from the cache Redis)
    assert any("warm p50" in line for line in lines)
    # the bench runs the two Redis roles apart, as `serve` does: no warning that queued jobs could be evicted
    assert "queued jobs and job records can be evicted" not in result.stderr


def test_bench_click_refuses_to_run_without_weights(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SAM_CHECKPOINT"}
    result = subprocess.run([sys.executable, "-m", "backend.commands.cli", "bench", "click"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--random-weights" in result.stderr


def test_keep_alive_outlasts_label_studios_idle_reuse():
    # Label Studio reuses a connection after 1-3 s idle and does not retry a POST: a server that
    # closes idle connections sooner (gunicorn's default 2 s) loses clicks in that race
    from backend.web.server import gunicorn_options

    assert gunicorn_options(Settings())["keepalive"] >= 30


def test_bench_load_prints_a_table_and_a_json_last_line(tiny_checkpoint):
    # every fault at once, briefly: the answers are checked by the bench itself (size, label, same mask)
    env = dict(os.environ, SAM_CHECKPOINT=str(tiny_checkpoint))
    result = subprocess.run(
        [sys.executable, "-m", "backend.commands.cli", "bench", "load", "--annotators", "3", "--duration", "6",
         "--sizes", "1MP", "--images", "1", "--baseline-clicks", "3", "--workers", "1", "--threads", "4",
         "--slow-clients", "2", "--hung-image-host", "--kill-redis-at", "2", "--image-timeout", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert "warm p50 / p95 / p99 ms" in result.stdout and "failed clicks" in result.stdout
    assert figures["clicks"] > 0 and figures["failed"] == 0 and figures["wrong"] == 0
    assert figures["hung_host_refusals"] >= 1 and figures["faults"]["slow_clients"] == 2


def test_web_workers_share_the_cores_unless_torch_threads_says_otherwise():
    # every core in every web worker oversubscribed the cores as soon as two workers decoded at once
    from backend.web.server import web_torch_threads

    assert web_torch_threads(Settings(workers=2), cpus=2) == 1
    assert web_torch_threads(Settings(workers=3), cpus=2) == 1
    assert web_torch_threads(Settings(workers=1), cpus=8) == 8
    assert web_torch_threads(Settings(workers=2, torch_threads=3), cpus=2) == 3
