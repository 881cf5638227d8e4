"""`sam-backend train` (once, inline, or on a schedule) and `sam-backend heads` (list, rollback)."""

from __future__ import annotations

import datetime
import re
import sys
import time

from tqdm import tqdm

from backend.jobs import queues
from backend.jobs.follow import follow_jobs
from backend.jobs.training import run_training
from backend.pipeline.model_loader import ModelLoader
from backend.services import Services
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


def _train_inline(services, project_id: int, out) -> int:
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


def _train_queued(services, project_id: int, out, wait: bool) -> int:
    connection = services.redis
    state = queues.enqueue_train(connection, project_id, services.settings.train_timeout)
    job_id = queues.train_job_id(project_id)
    print(f"project {project_id}: training {'queued' if state != 'waiting' else 'already queued or running'} "
          f"(job {job_id}, queue {queues.TRAIN_QUEUE})", file=out)
    if not wait:
        return 0
    shown = [None]

    def show_progress(job, bar) -> None:
        progress = job.get_meta(refresh=False).get("progress")
        if progress and progress != shown[0]:
            shown[0] = progress
            bar.write(f"  {progress['stage']}: {progress['done']}/{progress['total']}")

    failures = follow_jobs(connection, queues.TRAIN_QUEUE, {job_id: f"training of project {project_id}"},
                           "training", out, on_running=show_progress)
    for name, error in failures.items():
        print(f"{name} failed: {error}", file=out)
    if failures:
        return 1
    summary = queues.last_training(connection, project_id)
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
    # queued runs train on a worker: this process needs no checkpoint of its own
    services = Services.build(settings, ModelLoader(settings, download=inline))
    while True:
        started = time.monotonic()
        code = _train_inline(services, project_id, out) if inline else \
            _train_queued(services, project_id, out, wait or period is not None)
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
