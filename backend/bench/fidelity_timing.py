"""The timing half of `sam-backend bench fidelity`: zoomed clicks at 20 MP through the real HTTP stack.

The backend runs as `sam-backend serve` runs it (gunicorn, embedded Redis) with the real SAM
architecture (random weights: the same cost as real ones, the masks are noise) behind an image
host serving one synthetic screen as a JPEG. Random weights answer noise, so the zoom path is
steered with boxes, as the smart rectangle tool sends them: a small box decides its window
without the whole-image answer, whatever the weights.

- first touch: the first box on the image embeds the whole image (every click needs its size) and
  one window;
- cold zoomed click: the whole image's embedding is cached, the box's window is not: one window
  encode (the full-resolution image is kept by the process after the first touch), decode;
- warm zoomed click: the same boxes again, moved by a pixel or two (the same grid windows), for
  brush and for polygon output.
"""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from backend.bench.click import (_ImageHandler, _percentile, _post, _TOKEN, _wait_health, bench_checkpoint, free_port,
                                 synthetic_jpeg)
from backend.bench.screens import Screen
from backend.web.embedded_redis import start_embedded
from backend.web.server import stop_process

_URL = "/data/upload/screen.jpg"


def _config(output: str) -> str:
    tag = "BrushLabels" if output == "brush" else "PolygonLabels"
    return (
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="box" toName="image" smart="true"><Label value="Defect"/></RectangleLabels>'
        f'<{tag} name="out" toName="image"><Label value="Defect"/></{tag}></View>'
    )


def box_body(url: str, output: str, box, size: tuple[int, int]) -> dict:
    height, width = size
    x0, y0, x1, y1 = box
    region = {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x0 / width * 100, "y": y0 / height * 100, "width": (x1 - x0) / width * 100,
                  "height": (y1 - y0) / height * 100, "rotation": 0, "rectanglelabels": ["Defect"]},
        "id": "bench", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
    }
    return {"tasks": [{"id": 1, "data": {"image": url}}], "project": "1.1", "label_config": _config(output),
            "params": {"login": None, "password": None, "context": {"result": [region]}}}


def _stats(values: list[float]) -> dict:
    return {"p50": round(_percentile(values, 50), 1), "p95": round(_percentile(values, 95), 1),
            "min": round(min(values), 1), "n": len(values)}


def _path_of(body: bytes) -> tuple[str, int]:
    import json

    regions = json.loads(body)["results"][0]["result"]
    meta = regions[0].get("meta", {}) if regions else {}
    return meta.get("sam_path", "none"), meta.get("sam_windows", 0)


def time_zoom_clicks(args, screen: Screen) -> dict:
    if not args.random_weights and not args.checkpoint:
        bench_checkpoint(args, Path("."))  # exits with the reason, before starting anything
    work = Path(tempfile.mkdtemp(prefix="sam-fidelity-"))
    # the job store and the embedding cache apart, as `serve` runs them (a cache may evict, a queue never)
    store, cache = start_embedded(work / "redis", "4gb")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    proc = None
    try:
        checkpoint = args.checkpoint or bench_checkpoint(args, work)
        print("rendering the screen as a JPEG ...", flush=True)
        buf = io.BytesIO()
        Image.fromarray(screen.render()).save(buf, format="JPEG", quality=90)
        _ImageHandler.files[_URL] = buf.getvalue()
        _ImageHandler.files["/data/upload/warmup.jpg"] = synthetic_jpeg((640, 480), seed=99)
        port = free_port()
        env = dict(os.environ, SAM_CHECKPOINT=str(checkpoint), REDIS_URL=store.url, CACHE_REDIS_URL=cache.url,
                   LABEL_STUDIO_URL=f"http://127.0.0.1:{httpd.server_address[1]}", LABEL_STUDIO_API_KEY=_TOKEN,
                   MODEL_DIR=str(work / "models"), WORKERS="1", THREADS=str(args.threads), LOG_LEVEL="WARNING",
                   DEVICE=args.device, WARM_WORKERS="0", ZOOM_MAX=str(args.max_zoom),
                   ZOOM_THRESHOLD=str(args.threshold), ZOOM_MAX_WINDOWS=str(args.max_windows))
        proc = subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        _wait_health(base, proc)
        session = requests.Session()
        _post(session, base, box_body("/data/upload/warmup.jpg", "brush", (100, 100, 300, 300), (480, 640)))
        size = screen.size
        height, width = size
        small = [d for d in screen.defects if d.kind in ("pit", "blemish")][: max(args.cold, 1) + 1]
        # the first box embeds the whole image too (every click needs its size and, for clicks, its
        # answer): its figure is the image's first touch, not a cold zoomed click
        start = time.perf_counter()
        _, body, first_timing = _post(session, base, box_body(_URL, "brush", small[0].box, size))
        whole_ms = (time.perf_counter() - start) * 1000
        cold, stages = [], []
        print(f"cold zoomed clicks ({len(small) - 1}, one window encode each) ...", flush=True)
        for defect in small[1:]:
            elapsed, body, timing = _post(session, base, box_body(_URL, "brush", defect.box, size))
            path, windows = _path_of(body)
            if path != "zoom":
                raise RuntimeError(f"a box around {defect.name} took the {path} path, not the zoom path")
            cold.append(elapsed)
            stages.append(timing)
        figures = {"image": {"width": width, "height": height, "jpeg_bytes": len(_ImageHandler.files[_URL])},
                   "model_type": "checkpoint" if args.checkpoint else args.model_type,
                   "random_weights": bool(args.random_weights and not args.checkpoint),
                   "device": args.device, "threads": args.threads, "first_touch_ms": round(whole_ms, 1),
                   "first_touch_stages_ms": {k: round(v, 1) for k, v in first_timing.items()},
                   "cold_zoom_ms": _stats(cold),
                   "cold_stages_ms_p50": {k: round(float(np.median([s.get(k, 0.0) for s in stages])), 1)
                                          for k in sorted({k for s in stages for k in s})}}
        rng = np.random.default_rng(0)
        for output in ("brush", "polygon"):
            warm, server, windows_used = [], [], []
            print(f"warm zoomed clicks, {output} ({args.warm}) ...", flush=True)
            for i in range(args.warm):
                x0, y0, x1, y1 = small[i % len(small)].box
                dx, dy = rng.integers(-2, 3, size=2)
                elapsed, body, timing = _post(session, base, box_body(_URL, output, (x0 + dx, y0 + dy, x1 + dx, y1 + dy),
                                                                      size))
                path, windows = _path_of(body)
                if path != "zoom":
                    raise RuntimeError(f"a warm box took the {path} path, not the zoom path")
                if timing.get("encode", 0.0) > 0:
                    raise RuntimeError("a warm zoomed click encoded a window: its grid window was not reused")
                warm.append(elapsed)
                server.append(timing.get("total", float("nan")))
                windows_used.append(windows)
            figures[f"warm_zoom_{output}_ms"] = _stats(warm)
            figures[f"warm_zoom_{output}_server_ms_p50"] = round(_percentile(server, 50), 1)
            figures[f"warm_zoom_{output}_windows_p50"] = float(np.median(windows_used))
        return figures
    finally:
        if proc is not None:
            stop_process(proc, grace=30, group=True)
        httpd.shutdown()
        store.stop()
        cache.stop()


def print_timing(timing: dict) -> None:
    img = timing["image"]
    weights = "random weights" if timing["random_weights"] else "given checkpoint"
    print()
    print(f"zoomed clicks through gunicorn + Redis, SAM {timing['model_type']} ({weights}), device {timing['device']},"
          f" {img['width']}x{img['height']} JPEG ({img['jpeg_bytes'] / 1e6:.1f} MB), boxes around pits and blemishes")
    header = f"{'click':<24} {'p50':>9} {'p95':>9} {'n':>4}"
    print(header)
    print("-" * len(header))
    rows = [("cold (1 window encode)", timing["cold_zoom_ms"]), ("warm brush", timing["warm_zoom_brush_ms"]),
            ("warm polygon", timing["warm_zoom_polygon_ms"])]
    for name, s in rows:
        print(f"{name:<24} {s['p50']:>7.0f}ms {s['p95']:>7.0f}ms {s['n']:>4}")
    stages = ", ".join(f"{k} {v:.0f}ms" for k, v in timing["cold_stages_ms_p50"].items())
    print(f"cold click stages (p50): {stages}")
    print(f"first click on the image (whole-image encode + one window encode): {timing['first_touch_ms']:.0f}ms")
