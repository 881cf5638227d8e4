"""`sam-backend bench click`: latency of cold and warm clicks through the real HTTP stack.

Starts the backend exactly as `sam-backend serve` does (gunicorn, Redis), an HTTP server for the
images, and sends Label Studio's own request shape. Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
import requests
from PIL import Image

from backend.web.embedded_redis import start_embedded
from backend.labelstudio.label_config import OutputTag
from backend.labelstudio.results import pixel_region, polygon_regions
from backend.settings import Settings
from backend.web.server import stop_process

SIZES = {"1MP": (1280, 800), "20MP": (5472, 3648)}
_TOKEN = "benchtoken0123456789abcdef0123456789abcd"


OUTPUT_TAGS = {"brush": "BrushLabels", "polygon": "PolygonLabels", "bitmask": "BitmaskLabels"}


def _config(output: str) -> str:
    tag = OUTPUT_TAGS[output]
    return (
        '<View><Image name="image" value="$image"/>'
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>'
        f'<{tag} name="out" toName="image"><Label value="Object"/></{tag}></View>'
    )


def _click_body(url: str, output: str, x: float, y: float, size: tuple[int, int], project: int = 1) -> dict:
    width, height = size
    region = {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"]},
        "is_positive": True, "id": "bench", "from_name": "kp", "to_name": "image", "type": "keypointlabels",
    }
    return {
        "tasks": [{"id": 1, "data": {"image": url}}],
        "project": f"{project}.1", "label_config": _config(output),
        "params": {"login": None, "password": None, "context": {"result": [region]}},
    }


def synthetic_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A photo-like JPEG: smooth gradients, a few shapes, some noise (compresses like a real photo)."""
    width, height = size
    rng = np.random.default_rng(seed)
    small = (rng.random((height // 32 + 1, width // 32 + 1, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    arr = np.asarray(img).copy()
    arr += rng.integers(0, 12, size=arr.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def smooth_logits(low_res_side: int = 256, input_size: tuple[int, int] = (1024, 1024)) -> np.ndarray:
    """Logits of an object-shaped mask (an ellipse with a bump) on SAM's 256 grid: what real weights give."""
    yy, xx = np.mgrid[0:low_res_side, 0:low_res_side].astype(np.float32)
    h, w = input_size
    side = max(h, w)  # the padded input square the grid covers (1024, or 512 for EfficientViT-SAM L)
    cy, cx = low_res_side * h / side * 0.5, low_res_side * w / side * 0.45
    d = ((xx - cx) / (w / side * 70)) ** 2 + ((yy - cy) / (h / side * 50)) ** 2
    bump = ((xx - cx - 55) / 20) ** 2 + ((yy - cy) / 25) ** 2
    return (np.maximum(1 - d, 1 - bump) * 8).astype(np.float32)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None or self.headers.get("Authorization") != f"Token {_TOKEN}":
            self.send_response(404 if body is None else 401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def input_side(model_type: str) -> int:
    from model.efficientvit_family import INPUT_SIDES

    return INPUT_SIDES.get(model_type, 1024)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _server_timing(header: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+);dur=([\d.]+)", header or "")}


def bench_checkpoint(args, work: Path) -> str:
    """SAM_CHECKPOINT, or with --random-weights a random-weight checkpoint of the real architecture
    (same cost as real weights; the masks are noise, so only timings mean anything)."""
    if not args.random_weights:
        checkpoint = Settings.from_env().sam_checkpoint  # the one reader of the environment
        if not checkpoint:
            sys.exit("benchmarks need real weights (SAM_CHECKPOINT) or the explicit --random-weights flag")
        return checkpoint
    import torch

    from model.families import random_checkpoint

    path = work / f"random_{args.model_type}.pth"
    print(f"writing a random-weight {args.model_type} checkpoint (benchmark only) ...", flush=True)
    torch.save(random_checkpoint(args.model_type), path)
    return str(path)


def _time_output(kind: str, logits_input: np.ndarray, size: tuple[int, int], repeat: int = 5) -> tuple[float, int]:
    """Output stage (mask -> region -> JSON) on given logits, in-process: p50 ms and JSON bytes."""
    width, height = size
    tag = OutputTag("out", kind, ("Object",))
    times, nbytes = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        if kind in ("brush", "bitmask"):
            regions = [pixel_region(tag, "image", "Object", logits_input, (height, width), 0.9)]
        else:
            d = Settings()  # the defaults the server runs with, bounds for the page included
            regions = polygon_regions(tag, "image", "Object", logits_input, (height, width), 0.9, d.polygon_tolerance,
                                      d.polygon_min_area, d.polygon_max_vertices, d.polygon_max_parts)
        nbytes = len(json.dumps({"results": [{"result": regions}]}, separators=(",", ":")))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), nbytes


def run_click_bench(args) -> dict:
    if not args.random_weights:
        bench_checkpoint(args, Path("."))  # exits with the reason, before starting anything
    work = Path(tempfile.mkdtemp(prefix="sam-bench-"))
    procs: list = []
    # the job store and the embedding cache apart, as `serve` runs them (a cache may evict, a queue never)
    store, cache = start_embedded(work / "redis", "4gb")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    image_base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        checkpoint = bench_checkpoint(args, work)
        sizes = [s for s in args.sizes.split(",") if s]
        print("generating images ...", flush=True)
        for size_name in sizes:
            for i in range(args.cold):
                _ImageHandler.files[f"/data/upload/{size_name}-{i}.jpg"] = synthetic_jpeg(SIZES[size_name], seed=i)
        _ImageHandler.files["/data/upload/warmup.jpg"] = synthetic_jpeg((640, 480), seed=99)

        port = free_port()
        env = dict(os.environ, SAM_CHECKPOINT=checkpoint, REDIS_URL=store.url, CACHE_REDIS_URL=cache.url, LABEL_STUDIO_URL=image_base,
                   LABEL_STUDIO_API_KEY=_TOKEN, MODEL_DIR=str(work / "models"), WORKERS="1",
                   THREADS=str(args.threads), LOG_LEVEL="WARNING", DEVICE=args.device, WARM_WORKERS="0")
        proc = subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, start_new_session=True)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        _wait_health(base, proc)
        session = requests.Session()
        # first click loads SAM in the worker and exports the decoder: not part of any figure
        _post(session, base, _click_body("/data/upload/warmup.jpg", "brush", 50, 50, (640, 480)))
        if args.head:
            _install_head(work / "models" / "heads", requests.get(base + "/health", timeout=10).json()["model_version"])

        figures: dict = {"model_type": args.model_type, "random_weights": bool(args.random_weights),
                         "device": args.device, "threads": args.threads, "sizes": {}}
        rng = np.random.default_rng(0)
        for size_name in sizes:
            size = SIZES[size_name]
            cold = []
            for i in range(args.cold):
                elapsed, _, timing = _post(session, base, _click_body(f"/data/upload/{size_name}-{i}.jpg", "brush", 45, 50, size))
                cold.append(elapsed)
            row = {"cold_ms": _stats(cold)}
            for output in args.outputs.split(","):
                warm, stage, nbytes, server, decode = [], [], [], [], []
                for _ in range(args.warm):
                    x, y = rng.uniform(10, 90, size=2)
                    elapsed, body, timing = _post(session, base, _click_body(f"/data/upload/{size_name}-0.jpg", output, x, y, size))
                    warm.append(elapsed)
                    server.append(timing.get("total", float("nan")))
                    decode.append(timing.get("decode", float("nan")))
                    stage.append(timing.get(output, 0.0) + _json_ms(body))
                    nbytes.append(len(body))
                out_p50 = statistics.median(stage)
                head_warm, head_stage = [], []
                for _ in range(args.warm if args.head else 0):  # the same clicks on a project served a head
                    x, y = rng.uniform(10, 90, size=2)
                    elapsed, body, timing = _post(session, base, _click_body(f"/data/upload/{size_name}-0.jpg", output,
                                                                            x, y, size, project=HEAD_PROJECT))
                    head_warm.append(elapsed)
                    head_stage.append(timing.get("head", float("nan")))
                side = input_side(args.model_type)
                in_h, in_w = (side, round(side * size[0] / size[1])) if size[1] > size[0] else (round(side * size[1] / size[0]), side)
                from model.masks import logits_at_input

                smooth_input = logits_at_input(smooth_logits(256, (in_h, in_w)), (in_h, in_w))
                smooth_ms, smooth_bytes = _time_output(output, smooth_input, size)
                warm_p50 = _percentile(warm, 50)
                row[output] = {
                    "warm_ms": _stats(warm),
                    "server_ms_p50": round(statistics.median(server), 2),
                    "decoder_ms_p50": round(statistics.median(decode), 2),
                    "response_bytes_p50": int(statistics.median(nbytes)),
                    "output_stage_ms_p50": round(out_p50, 2),
                    "smooth_output_stage_ms": round(smooth_ms, 2),
                    "smooth_response_bytes": smooth_bytes,
                    "smooth_warm_ms_p50": round(warm_p50 - out_p50 + smooth_ms, 2),
                    "cold_over_warm": round(_percentile(cold, 50) / warm_p50, 1),
                }
                if head_warm:
                    row[output]["head_warm_ms"] = _stats(head_warm)
                    row[output]["head_stage_ms_p50"] = round(statistics.median(head_stage), 2)
            figures["sizes"][size_name] = row
        stored = redis.Redis.from_url(cache.url)
        sizes_stored = [stored.strlen(k) for k in stored.keys("sam-backend:emb:*")]
        figures["embedding_bytes"] = {"p50": int(statistics.median(sizes_stored)), "max": max(sizes_stored),
                                      "n": len(sizes_stored)}
        return figures
    finally:
        for proc in procs:
            stop_process(proc, grace=30, group=True)
        httpd.shutdown()
        store.stop()
        cache.stop()


HEAD_PROJECT = 2


def _install_head(heads_dir: Path, model_version: str) -> None:
    """Serve project HEAD_PROJECT a refinement head (untrained: a trained one costs the same time)."""
    from model.refine import RefineHead
    from model.registry import HeadRegistry

    registry = HeadRegistry(heads_dir)
    from model.segmenter import safe_id

    # model ids: SAM's version less "sam-", the other families' version made id-safe (model.segmenter)
    base = model_version.removeprefix("sam-") if model_version.startswith("sam-") else safe_id(model_version)
    saved = registry.save(HEAD_PROJECT, RefineHead(), {"base_model_id": base,
                                                       "status": "promoted", "reason": "bench"})
    registry.set_current(HEAD_PROJECT, saved.version, "bench click --head")


def print_click_table(figures: dict) -> None:
    print()
    print(f"click latency, {figures['model_type']} ({'random weights' if figures['random_weights'] else 'checkpoint'}),"
          f" device {figures['device']}, through gunicorn + Redis")
    header = f"{'image':<6} {'output':<8} {'cold p50':>9} {'warm p50':>9} {'warm p95':>9} {'out stage':>10} {'bytes':>10}" \
             f" {'smooth out':>11} {'smooth p50':>11} {'smooth B':>9} {'cold/warm':>9}"
    print(header)
    print("-" * len(header))
    for size_name, row in figures["sizes"].items():
        for output, r in row.items():
            if output == "cold_ms":
                continue
            print(f"{size_name:<6} {output:<8} {row['cold_ms']['p50']:>8.0f}ms {r['warm_ms']['p50']:>7.1f}ms"
                  f" {r['warm_ms']['p95']:>7.1f}ms {r['output_stage_ms_p50']:>8.1f}ms {r['response_bytes_p50']:>10}"
                  f" {r['smooth_output_stage_ms']:>9.1f}ms {r['smooth_warm_ms_p50']:>9.1f}ms {r['smooth_response_bytes']:>9}"
                  f" {r['cold_over_warm']:>8.1f}x")
    for size_name, row in figures["sizes"].items():
        for output, r in row.items():
            if output != "cold_ms" and "head_warm_ms" in r:
                print(f"{size_name:<6} {output:<8} with a refinement head: warm p50 {r['head_warm_ms']['p50']:.1f}ms, "
                      f"p95 {r['head_warm_ms']['p95']:.1f}ms (head stage {r['head_stage_ms_p50']:.1f}ms)")
    emb = figures["embedding_bytes"]
    print(f"stored embedding: {emb['p50'] / 1e6:.2f} MB p50, {emb['max'] / 1e6:.2f} MB max over {emb['n']} images")
    print("out stage = mask -> regions -> JSON on the served (random-weight) mask; smooth = the same stage on an"
          " object-shaped mask of the same size, and the warm p50 with it swapped in")


def _stats(values: list[float]) -> dict:
    return {"p50": round(_percentile(values, 50), 2), "p95": round(_percentile(values, 95), 2),
            "min": round(min(values), 2), "n": len(values)}


def _json_ms(body: bytes) -> float:
    """Time to serialise this response body again: the JSON part of the output stage."""
    parsed = json.loads(body)
    start = time.perf_counter()
    json.dumps(parsed, separators=(",", ":"))
    return (time.perf_counter() - start) * 1000


def _post(session: requests.Session, base: str, body: dict) -> tuple[float, bytes, dict]:
    start = time.perf_counter()
    response = session.post(base + "/predict", json=body, timeout=900)
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:300]}")
    return elapsed, response.content, _server_timing(response.headers.get("Server-Timing"))


def _wait_health(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the backend exited before answering /health")
        try:
            if requests.get(base + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet: keep polling until the deadline
        time.sleep(0.2)
    raise RuntimeError("the backend did not answer /health in time")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
