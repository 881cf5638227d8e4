"""`sam-backend bench load`: simulated annotators clicking through the real stack (`sam-backend serve`
under gunicorn, the job store and cache Redis, an embedding worker, an image host) for a fixed time,
with optional faults. Every answer is checked against its own task: the image size, the label, and
for a prompt already answered once, the very same mask. Prints a table, then one JSON line."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import requests

from backend.bench.click import (_ImageHandler, _TOKEN, SIZES, _click_body, _percentile, _wait_health,
                                 bench_checkpoint, free_port, synthetic_jpeg)
from backend.web.embedded_redis import EmbeddedRedis, start_embedded
from backend.settings import Settings
from backend.web.server import stop_process, web_torch_threads

PROMPTS = [(30.0, 40.0), (50.0, 50.0), (70.0, 35.0), (45.0, 70.0)]  # a few clicks per image, repeated


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: Counter = Counter()
        self.wrong = 0
        self.expected_refusals = 0
        self.slow_cut_off = 0
        self.references: dict[tuple, list] = {}

    def check(self, key: tuple, size: tuple[int, int], body: dict) -> bool:
        """The answer belongs to its task: right size and label, and the same mask as before for the same prompt."""
        regions = body["results"][0]["result"]
        if not regions:
            return False
        width, height = size
        if any(r["original_width"] != width or r["original_height"] != height for r in regions):
            return False
        if any(r["value"].get("brushlabels") != ["Object"] for r in regions):
            return False
        masks = [r["value"]["rle"] for r in regions]
        with self.lock:
            reference = self.references.setdefault(key, masks)
        return reference == masks


def _hung_host() -> tuple[socket.socket, str]:
    """An image host that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list = []

    def accept_forever() -> None:
        try:
            while True:
                held.append(server.accept())  # keep the connection open, say nothing
        except OSError:
            return  # closed at the end of the bench

    threading.Thread(target=accept_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}"


def _slow_client(port: int, stats: _Stats, stop: threading.Event) -> None:
    """Sends the start of a request body, then a byte now and then: never finishes. When the server
    cuts it off (REQUEST_READ_TIMEOUT), it connects again: the fault lasts the whole run."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{")
                while not stop.wait(2):
                    sock.sendall(b" ")
        except OSError:  # the server gave up on us: what a server should do
            with stats.lock:
                stats.slow_cut_off += 1
            stop.wait(0.5)


def _annotator(base: str, images: list[tuple[str, tuple[int, int]]], stats: _Stats, stop: threading.Event,
               think: tuple[float, float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    session = requests.Session()  # one connection reused after idle pauses, as Label Studio does
    while not stop.is_set():
        url, size = images[int(rng.integers(len(images)))]
        x, y = PROMPTS[int(rng.integers(len(PROMPTS)))]
        start = time.perf_counter()
        try:
            response = session.post(base + "/predict", json=_click_body(url, "brush", x, y, size), timeout=120)
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                with stats.lock:
                    stats.errors[f"http {response.status_code}"] += 1
            # parsed with orjson: the load generator shares the cores with the server it measures
            elif not stats.check((url, x, y), size, orjson.loads(response.content)):
                with stats.lock:
                    stats.wrong += 1
            else:
                with stats.lock:
                    stats.latencies.append(elapsed)
        except requests.RequestException as exc:
            with stats.lock:
                stats.errors[exc.__class__.__name__] += 1
        stop.wait(rng.uniform(*think))


def _hung_clicker(base: str, url: str, stats: _Stats, stop: threading.Event) -> None:
    """Clicks on a task whose image host never answers: each must end in a clear error, not hang."""
    session = requests.Session()
    while not stop.is_set():
        try:
            response = session.post(base + "/predict", json=_click_body(url, "brush", 50, 50, (640, 480)), timeout=120)
            with stats.lock:
                if response.status_code == 502:
                    stats.expected_refusals += 1
                else:
                    stats.errors[f"hung host answered {response.status_code}"] += 1
        except requests.RequestException as exc:
            with stats.lock:
                stats.errors[f"hung host {exc.__class__.__name__}"] += 1
        stop.wait(1.0)


def _single_user_p50(base: str, images, clicks: int) -> float:
    stats, stop = _Stats(), threading.Event()
    session = requests.Session()
    for i in range(clicks):
        url, size = images[i % len(images)]
        x, y = PROMPTS[i % len(PROMPTS)]
        start = time.perf_counter()
        response = session.post(base + "/predict", json=_click_body(url, "brush", x, y, size), timeout=300)
        if response.status_code == 200:
            stats.latencies.append((time.perf_counter() - start) * 1000)
    stop.set()
    return _percentile(stats.latencies, 50)


def run_load_bench(args) -> dict:
    if not args.random_weights:
        bench_checkpoint(args, Path("."))  # exits with the reason, before starting anything
    work = Path(tempfile.mkdtemp(prefix="sam-bench-load-"))
    store, cache = start_embedded(work / "redis", "4gb")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    image_base = f"http://127.0.0.1:{httpd.server_address[1]}"
    hung, hung_base = _hung_host()
    proc = None
    try:
        checkpoint = bench_checkpoint(args, work)
        images = []
        for size_name in [s for s in args.sizes.split(",") if s]:
            for i in range(args.images):
                path = f"/data/upload/load-{size_name}-{i}.jpg"
                _ImageHandler.files[path] = synthetic_jpeg(SIZES[size_name], seed=100 + i)
                images.append((path, SIZES[size_name]))
        port = free_port()
        env = dict(os.environ, SAM_CHECKPOINT=checkpoint, REDIS_URL=store.url, CACHE_REDIS_URL=cache.url,
                   LABEL_STUDIO_URL=image_base, LABEL_STUDIO_API_KEY=_TOKEN, MODEL_DIR=str(work / "models"),
                   WORKERS=str(args.workers), THREADS=str(args.threads), LOG_LEVEL="WARNING", DEVICE=args.device,
                   WARM_WORKERS="1", IMAGE_TIMEOUT=str(args.image_timeout),
                   ALLOWED_IMAGE_HOSTS="127.0.0.1" if args.hung_image_host else "")
        proc = subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        _wait_health(base, proc)
        model_version = requests.get(base + "/health", timeout=10).json()["model_version"]
        # every prompt once: a click on a large image is answered on a zoom window around it, encoded
        # on its first click (warm clicks are measured here, not window encodes)
        print(f"embedding {len(images)} images and their prompts' zoom windows (cold clicks, not measured) ...",
              flush=True)
        for url, size in images:
            for x, y in PROMPTS:
                requests.post(base + "/predict", json=_click_body(url, "brush", x, y, size), timeout=900)
        single = _single_user_p50(base, images, args.baseline_clicks)

        stats, stop = _Stats(), threading.Event()
        threads = [threading.Thread(target=_annotator, args=(base, images, stats, stop, args.think_range, i),
                                    daemon=True) for i in range(args.annotators)]
        threads += [threading.Thread(target=_slow_client, args=(port, stats, stop), daemon=True)
                    for _ in range(args.slow_clients)]
        if args.hung_image_host:
            threads.append(threading.Thread(target=_hung_clicker, args=(base, hung_base + "/img.jpg", stats, stop),
                                            daemon=True))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        if args.kill_redis_at is not None:
            stop.wait(args.kill_redis_at)
            print("killing the cache Redis ...", flush=True)
            cache.proc.kill()
            cache.proc.wait()
            stop.wait(5)
            cache = EmbeddedRedis(work / "redis", maxmemory="4gb", name="embeddings").start()
        stop.wait(max(args.duration - (time.monotonic() - started), 0))
        stop.set()
        for thread in threads:
            thread.join(timeout=130)
        elapsed = time.monotonic() - started
        lat = stats.latencies
        clicks = len(lat) + stats.wrong + sum(stats.errors.values())
        return {
            "model_version": model_version, "random_weights": bool(args.random_weights), "workers": args.workers,
            "threads": args.threads, "web_torch_threads": web_torch_threads(
                Settings.from_env().replace(workers=args.workers)), "annotators": args.annotators, "duration_s": round(elapsed, 1),
            "faults": {"slow_clients": args.slow_clients, "hung_image_host": bool(args.hung_image_host),
                       "kill_redis_at": args.kill_redis_at},
            "clicks": clicks, "throughput_per_s": round(clicks / elapsed, 2),
            "warm_ms": {"p50": round(_percentile(lat, 50), 1), "p95": round(_percentile(lat, 95), 1),
                        "p99": round(_percentile(lat, 99), 1)},
            "single_user_warm_p50_ms": round(single, 1),
            "p95_over_single_p50": round(_percentile(lat, 95) / single, 2) if single else None,
            "failed": sum(stats.errors.values()), "errors": dict(stats.errors), "wrong": stats.wrong,
            "hung_host_refusals": stats.expected_refusals, "slow_clients_cut_off": stats.slow_cut_off,
        }
    finally:
        if proc is not None:
            stop_process(proc, grace=30, group=True)
        httpd.shutdown()
        hung.close()
        store.stop()
        cache.stop()


def print_load_table(f: dict) -> None:
    faults = ", ".join(f"{k}={v}" for k, v in f["faults"].items() if v) or "none"
    print(f"\nload: {f['annotators']} annotators for {f['duration_s']} s, {f['workers']} workers x {f['threads']} "
          f"threads ({f['web_torch_threads']} torch threads each), {f['model_version']}{' (random weights)' if f['random_weights'] else ''}, faults: {faults}")
    rows = [("clicks", f["clicks"]), ("throughput / s", f["throughput_per_s"]),
            ("warm p50 / p95 / p99 ms", f"{f['warm_ms']['p50']} / {f['warm_ms']['p95']} / {f['warm_ms']['p99']}"),
            ("single-user warm p50 ms", f["single_user_warm_p50_ms"]),
            ("p95 / single-user p50", f["p95_over_single_p50"]),
            ("failed clicks", f"{f['failed']} {json.dumps(f['errors']) if f['errors'] else ''}"),
            ("wrong answers", f["wrong"]), ("hung-host clicks refused (502)", f["hung_host_refusals"]),
            ("slow clients cut off (408)", f["slow_clients_cut_off"])]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(flush=True)
