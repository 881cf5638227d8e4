"""`sam-backend bench prelabel`: images per minute of `sam-backend prelabel` with 1 and 2 workers,
after segment everything's full grid against its coarse search (backend.bench.everything).

Runs the real thing: a Label Studio (started from its own virtualenv, SQLite, 127.0.0.1), a
project of synthetic photos in a local-files storage, Redis, RQ workers, and the real pre-label
jobs that embed, segment everything and post predictions. Between rounds the embeddings and the
drafts are deleted, so every round pays for the encoder on the same images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests
from rq import Worker

from backend.jobs import queues as jobs
from backend.bench.click import bench_checkpoint, free_port, synthetic_jpeg
from backend.bench.everything import print_everything_table, run_everything_figures
from backend.web.embedded_redis import EmbeddedRedis
from backend.web.server import stop_process

_TOKEN = "benchprelabeltoken0123456789abcdef012345"
# inline, not label_config/*.xml: that folder is not part of an installed package (the Docker image)
_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Plastic"/><Label value="Metal"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Plastic"/><Label value="Metal"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Plastic"/><Label value="Metal"/></PolygonLabels>
</View>"""


def _label_studio_executable(venv: str | None) -> str:
    candidates = [Path(venv) / "bin" / "label-studio"] if venv else []
    candidates += [Path.cwd() / ".ls-venv" / "bin" / "label-studio"]
    found = next((str(c) for c in candidates if c.exists()), None) or shutil.which("label-studio")
    if found is None:
        sys.exit("bench prelabel needs Label Studio: `python3 -m venv .ls-venv && .ls-venv/bin/pip install "
                 "label-studio==1.23.2`, or --label-studio-venv PATH")
    return found


def _start_label_studio(work: Path, files: Path, venv: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false", LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
               LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true", LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files),
               SENTRY_DSN="")
    proc = subprocess.Popen(
        [_label_studio_executable(venv), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
         "--data-dir", str(work / "ls-data"), "--username", "bench@example.com", "--password", "bench-pass-123",
         "--user-token", _TOKEN, "--enable-legacy-api-token"],
        env=env, stdout=open(work / "label-studio.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass  # still migrating the database: keep polling until the deadline
        time.sleep(1)
    stop_process(proc, group=True)
    sys.exit(f"Label Studio did not start; see {work / 'label-studio.log'}")


def _api(url: str, method: str, path: str, **kwargs) -> requests.Response:
    response = requests.request(method, url + path, headers={"Authorization": f"Token {_TOKEN}"}, timeout=120, **kwargs)
    response.raise_for_status()
    return response


def _make_project(ls_url: str, files: Path, images: int, size: tuple[int, int]) -> tuple[int, list[int]]:
    project = _api(ls_url, "POST", "/api/projects", json={"title": "bench prelabel",
                                                          "label_config": _CONFIG}).json()
    folder = files / "bench"
    folder.mkdir(parents=True)
    for i in range(images):
        (folder / f"img{i:03d}.jpg").write_bytes(synthetic_jpeg(size, seed=i))
    storage = _api(ls_url, "POST", "/api/storages/localfiles", json={
        "project": project["id"], "path": str(folder), "use_blob_urls": True, "title": "bench"}).json()
    _api(ls_url, "POST", f"/api/storages/localfiles/{storage['id']}/sync")
    tasks = _api(ls_url, "GET", "/api/tasks", params={"project": project["id"], "page_size": 10000}).json()["tasks"]
    return project["id"], [t["id"] for t in tasks]


def _reset(connection: redis.Redis, ls_url: str, task_ids: list[int]) -> None:
    """Forget embeddings and drafts so the next round does all the work again."""
    for pattern in ("sam-backend:emb:*", "sam-backend:url:*", "sam-backend:timings:*"):
        keys = connection.keys(pattern)
        if keys:
            connection.delete(*keys)
    for task_id in task_ids:
        for prediction in _api(ls_url, "GET", "/api/predictions", params={"task": task_id}).json():
            _api(ls_url, "DELETE", f"/api/predictions/{prediction['id']}")


def _models(args) -> list[str]:
    """--models vit_b,l0 (random weights of each real architecture), else the one --model-type / SAM_CHECKPOINT."""
    from model.families import MODEL_TYPES, installed

    if not args.models:
        return [args.model_type]
    wanted = [m for m in args.models.split(",") if m]
    unknown = [m for m in wanted if m not in MODEL_TYPES]
    if unknown:
        sys.exit(f"unknown model types {unknown}; known: {', '.join(MODEL_TYPES)}")
    if not args.random_weights:
        sys.exit("--models compares architectures with random weights: add --random-weights")
    missing = [m for m in wanted if not installed(m)]
    if missing:
        sys.exit(f"not installed here: {', '.join(missing)}")
    return wanted


def run_prelabel_bench(args) -> dict:
    models = _models(args)
    if not args.random_weights:
        bench_checkpoint(args, Path("."))  # exits with the reason, before starting anything
    work = Path(tempfile.mkdtemp(prefix="sam-bench-prelabel-"))
    files = work / "files"
    files.mkdir()
    redis_server = EmbeddedRedis(work / "redis", "4gb").start()
    connection = redis.Redis.from_url(redis_server.url)
    ls_proc = None
    try:
        checkpoints = {m: bench_checkpoint(argparse.Namespace(**{**vars(args), "model_type": m}), work) for m in models}
        from model.families import FAMILY_OF

        # the section times SAM's decoder (every family's decode is SAM-sized); only with a SAM checkpoint
        sam_model = next((m for m in models if FAMILY_OF.get(m) == "sam"), None) if args.random_weights else models[0]
        everything = run_everything_figures(checkpoints[sam_model], work, args) if sam_model else None
        if not args.rounds:
            return {"random_weights": bool(args.random_weights), "device": args.device,
                    "points_per_side": args.points_per_side, "search": args.search, "everything": everything,
                    "rounds": []}
        print("starting Label Studio ...", flush=True)
        ls_proc, ls_url = _start_label_studio(work, files, args.label_studio_venv)
        size = (args.width, args.height)
        project_id, task_ids = _make_project(ls_url, files, args.images, size)
        per_model = [_model_rounds(args, m, checkpoints[m], work, connection, redis_server.url, ls_url, project_id,
                                   task_ids) for m in models]
        figures = {"random_weights": bool(args.random_weights), "device": args.device,
                   "image_size": f"{args.width}x{args.height}", "points_per_side": args.points_per_side,
                   "search": args.search, "everything": everything, "models": per_model}
        first = per_model[0]  # the one-model layout as before (model_version, rounds, embedding_bytes_p50)
        figures.update({k: first[k] for k in ("model_version", "rounds", "embedding_bytes_p50")})
        base = next((r for r in per_model if r["model_type"] == "vit_b"), None)
        if base and len(per_model) > 1:
            figures["images_per_minute_vs_vit_b"] = {
                r["model_type"]: {str(a["workers"]): round(a["images_per_minute"] / b["images_per_minute"], 2)
                                  for a, b in zip(r["rounds"], base["rounds"]) if b["images_per_minute"]}
                for r in per_model if r is not base}
        return figures
    finally:
        if ls_proc is not None:
            stop_process(ls_proc, group=True)
        redis_server.stop()


def _model_rounds(args, model_type: str, checkpoint: str, work: Path, connection: redis.Redis, redis_url: str,
                  ls_url: str, project_id: int, task_ids: list[int]) -> dict:
    """Every --workers round with this model's workers on the same project (embeddings and drafts
    deleted before each round, so each one encodes every image)."""
    env = dict(os.environ, SAM_CHECKPOINT=checkpoint, REDIS_URL=redis_url, LABEL_STUDIO_URL=ls_url,
               LABEL_STUDIO_API_KEY=_TOKEN, MODEL_DIR=str(work / "models"), DEVICE=args.device,
               LOG_LEVEL="WARNING", PRELABEL_POINTS_PER_SIDE=str(args.points_per_side),
               PRELABEL_SEARCH=args.search, PRELABEL_MIN_AREA=str(args.min_area))
    from backend.pipeline.model_loader import ModelLoader
    from backend.settings import Settings

    model_settings = Settings.from_env(env)
    loader = ModelLoader(model_settings)
    model_version = loader.model_version
    rounds = []
    for count in [int(w) for w in args.workers.split(",")]:
        _reset(connection, ls_url, task_ids)
        connection.delete(f"sam-backend:done:{jobs.PRELABEL_QUEUE}")
        workers = [subprocess.Popen([sys.executable, "-m", "backend.commands.cli", "worker", "--queues",
                                     jobs.PRELABEL_QUEUE], env=env, start_new_session=True) for _ in range(count)]
        try:
            while Worker.count(queue=jobs.queue(connection, jobs.PRELABEL_QUEUE)) < count:
                time.sleep(0.5)  # each worker loads its model before taking a job: not part of the figure
            done_before = jobs.done_count(connection, jobs.PRELABEL_QUEUE)
            failed_before = jobs.queue(connection, jobs.PRELABEL_QUEUE).failed_job_registry.count
            print(f"{model_type}, {count} worker(s): pre-labelling {len(task_ids)} images ...", flush=True)
            start = time.monotonic()
            jobs.enqueue_prelabel(connection, loader.model_id, project_id, task_ids,
                                  batch=model_settings.encode_batch_size)
            while True:
                done = jobs.done_count(connection, jobs.PRELABEL_QUEUE) - done_before
                failed = jobs.queue(connection, jobs.PRELABEL_QUEUE).failed_job_registry.count - failed_before
                if done + failed >= len(task_ids):
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - start
        finally:
            for worker in workers:
                stop_process(worker, group=True)
        timings = jobs.recent_timings(connection, jobs.PRELABEL_QUEUE)[:len(task_ids)]  # this round's
        rounds.append({
            "workers": count, "images": len(task_ids), "failed": failed, "seconds": round(elapsed, 1),
            "images_per_minute": round(len(task_ids) / elapsed * 60, 2),
            "encoder_s_per_image": round(statistics.median(t.get("encode", 0.0) for t in timings), 2),
            "segment_everything_s_per_image": round(statistics.median(t.get("everything", 0.0) for t in timings), 2),
        })
    embedding_bytes = [connection.strlen(k) for k in connection.keys("sam-backend:emb:*")]
    return {"model_type": model_type, "model_version": model_version, "rounds": rounds,
            "embedding_bytes_p50": int(statistics.median(embedding_bytes)) if embedding_bytes else 0}


def print_prelabel_table(figures: dict) -> None:
    if figures["everything"]:
        print_everything_table(figures["everything"])
    if not figures["rounds"]:
        return
    print()
    print(f"pre-label throughput ({'random weights' if figures['random_weights'] else 'checkpoint'}), "
          f"{figures['image_size']} images, {figures['points_per_side']}x{figures['points_per_side']} prompt grid, "
          f"search {figures['search']}, device {figures['device']}")
    header = (f"{'model':<9} {'workers':>7} {'images':>6} {'failed':>6} {'seconds':>8} {'img/min':>8} "
              f"{'encode s/img':>13} {'everything s/img':>17} {'entry MB':>9}")
    print(header)
    print("-" * len(header))
    for m in figures["models"]:
        for r in m["rounds"]:
            print(f"{m['model_type']:<9} {r['workers']:>7} {r['images']:>6} {r['failed']:>6} {r['seconds']:>8.1f} "
                  f"{r['images_per_minute']:>8.2f} {r['encoder_s_per_image']:>13.2f} "
                  f"{r['segment_everything_s_per_image']:>17.2f} {m['embedding_bytes_p50'] / 1e6:>9.2f}")
    for model_type, ratios in figures.get("images_per_minute_vs_vit_b", {}).items():
        print(f"{model_type} drafts " + ", ".join(f"{x}x as many images a minute as vit_b with {w} worker(s)"
                                               for w, x in ratios.items()))
