"""`sam-backend train` (once, inline, or on a schedule) and `sam-backend heads` (list, rollback)."""

from __future__ import annotations

import datetime
import re
import sys
import time

import redis
from rq import Worker
from rq.job import JobStatus
from tqdm import tqdm

from backend import jobs
from backend.model_loader import ModelLoader
from backend.settings import Settings
from model.registry import HeadError, HeadRegistry

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> float:
    """'90s', '30m', '6h', '1d' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--every {text!r}: use a duration like 30m, 6h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def print_summary(summary: dict, out) -> None:
    print(f"project {summary['project']}: {summary['tasks']} annotated tasks, {summary['corrections']} objects "
          f"({summary['train']} train / {summary['heldout']} held out)", file=out)
    if summary["status"] == "skipped":
        print(f"skipped: {summary['reason']}", file=out)
        return
    metrics = summary["metrics"]
    print(f"{'':10} {'mIoU':>6} {'1 click':>8} {'box':>6} {'bIoU':>6} {'NoC@85':>7} {'NoC@90':>7}", file=out)
    for name in ("base", "served", "candidate"):
        m = metrics[name]
        print(f"{name:10} {m['miou']:6.1f} {m['miou_click']:8.1f} {m['miou_box']:6.1f} {m['boundary_iou']:6.1f} "
              f"{m['noc85']:7.2f} {m['noc90']:7.2f}", file=out)
    print(f"head {summary['version']} {summary['status']}: {summary['reason']} "
          f"(trained in {summary['train_seconds']:.0f} s)", file=out)


def _train_inline(settings: Settings, project_id: int, out) -> int:
    from backend.app import Services
    from backend.training import run_training

    services = Services.build(settings)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", file=out, leave=False)
        bar.update(done - bar.n)

    summary = run_training(services, project_id, progress)
    for bar in bars.values():
        bar.close()
    print_summary(summary, out)
    return 0


def _train_queued(connection: redis.Redis, settings: Settings, project_id: int, wait: bool, out) -> int:
    state = jobs.enqueue_train(connection, project_id, settings.train_timeout)
    job_id = jobs.train_job_id(project_id)
    print(f"project {project_id}: training {'queued' if state != 'waiting' else 'already queued or running'} "
          f"(job {job_id}, queue {jobs.TRAIN_QUEUE})", file=out)
    if not wait:
        return 0
    if Worker.count(queue=jobs.queue(connection, jobs.TRAIN_QUEUE)) == 0:
        print(f"no worker listens on {jobs.TRAIN_QUEUE} yet: start `sam-backend worker` (or use --inline)", file=out)
    shown = None
    while True:
        job = jobs.fetch_job(connection, job_id)
        if job is None:
            break  # done: finished jobs are deleted at once
        status = job.get_status(refresh=False)
        if status == JobStatus.FAILED:
            result = job.latest_result()
            print(f"training failed: {(result.exc_string if result else '').strip()[-2000:]}", file=out)
            return 1
        if jobs.abandoned(connection, job):
            jobs.enqueue_train(connection, project_id, settings.train_timeout)
            print("the worker running the training died; queued again", file=out)
        progress = job.get_meta(refresh=False).get("progress")
        if progress and progress != shown:
            shown = progress
            print(f"  {progress['stage']}: {progress['done']}/{progress['total']}", file=out, flush=True)
        time.sleep(1.0)
    summary = jobs.last_training(connection, project_id)
    if summary is None:
        print("training finished, but its summary is not in Redis", file=out)
        return 1
    print_summary(summary, out)
    return 0


def train(settings: Settings, project_id: int, inline: bool, wait: bool, every: str | None, out=None) -> int:
    out = out or sys.stdout
    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: training reads the project's annotations", file=out)
        return 2
    if not inline and not settings.redis_url:
        print("error: set REDIS_URL (training runs on workers), or use --inline to train in this process", file=out)
        return 2
    try:
        period = parse_every(every) if every else None
    except ValueError as exc:
        print(f"error: {exc}", file=out)
        return 2
    connection = None if inline else redis.Redis.from_url(settings.redis_url)
    while True:
        started = time.monotonic()
        code = _train_inline(settings, project_id, out) if inline else \
            _train_queued(connection, settings, project_id, wait or period is not None, out)
        if period is None:
            return code
        pause = max(period - (time.monotonic() - started), 0)
        next_run = datetime.datetime.now() + datetime.timedelta(seconds=pause)
        print(f"next training of project {project_id} at {next_run:%Y-%m-%d %H:%M}", file=out, flush=True)
        time.sleep(pause)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def heads(settings: Settings, project_id: int, rollback: str | None, off: bool, out=None) -> int:
    out = out or sys.stdout
    registry = HeadRegistry(settings.head_registry_dir)
    if off:
        registry.set_current(project_id, None, "turned off by `sam-backend heads --off`")
        print(f"project {project_id}: serving plain SAM", file=out)
        return 0
    if rollback:
        loader = ModelLoader(settings, download=False)
        try:
            registry.load(project_id, rollback, loader.model_id or None)
            registry.set_current(project_id, rollback, "rollback by `sam-backend heads --rollback`")
        except HeadError as exc:
            print(f"error: {exc}", file=out)
            return 2
        print(f"project {project_id}: now serving head {rollback} (workers switch within "
              f"{settings.head_reload_seconds:.0f} s)", file=out)
        return 0
    versions = registry.versions(project_id)
    if not versions:
        print(f"project {project_id} has no refinement heads in {registry.project_dir(project_id)}", file=out)
        return 0
    current = registry.current(project_id)
    print(f"   {'version':8} {'status':9} {'created':16} {'mIoU':>6} {'vs SAM':>7} {'NoC@90':>7} {'SAM':>6} "
          f"{'train':>6} {'secs':>5}  reason", file=out)
    for v in versions:
        meta = v.meta
        cand = meta.get("metrics", {}).get("candidate", {})
        base = meta.get("metrics", {}).get("base", {})
        created = datetime.datetime.fromtimestamp(meta.get("created", 0)).strftime("%Y-%m-%d %H:%M")
        mark = "*" if v.version == current else " "
        gain = cand["miou"] - base["miou"] if "miou" in cand and "miou" in base else None
        print(f" {mark} {v.version:8} {meta.get('status', '?'):9} {created:16} {_fmt(cand.get('miou'), '6.1f'):>6} "
              f"{_fmt(gain, '+7.1f'):>7} {_fmt(cand.get('noc90'), '7.2f'):>7} {_fmt(base.get('noc90'), '6.2f'):>6} "
              f"{meta.get('corrections', {}).get('train', 0):6d} {meta.get('train_seconds', 0):5.0f}  "
              f"{meta.get('reason', '')}", file=out)
    print(f"* = served{'' if current else ' (none: plain SAM)'}; roll back with "
          f"`sam-backend heads --project {project_id} --rollback VERSION`", file=out)
    return 0
