"""Follow queued jobs to the end for a command's --wait: a progress bar (done / total, rate, ETA,
failures), jobs of dead workers queued again, and the failures named at the end."""

from __future__ import annotations

import time
from typing import Callable

import redis
from rq import Worker
from rq.job import Job, JobStatus
from tqdm import tqdm

from backend.jobs import queues


def failure_line(job: Job) -> str:
    """Why a job failed: the sweep's reason, else the last line of its traceback (not the stack)."""
    if job.get_meta(refresh=False).get("failure"):
        return job.meta["failure"]
    result = job.latest_result()
    lines = (result.exc_string or "").strip().splitlines() if result else []
    return lines[-1] if lines else "failed"


def follow_jobs(connection: redis.Redis, queue_name: str, job_ids: dict[str, str], what: str, out,
                on_running: Callable[[Job, tqdm], None] | None = None, poll: float = 1.0,
                max_retries: int = 2) -> dict[str, str]:
    """Wait until every job is done or failed; returns {name: error} of the failed ones.

    Each job is read once per round (one snapshot). A finished job keeps a short record, so a job
    with no record at all was lost (its Redis was flushed or restarted empty): it is reported as
    failed with that reason. A started job whose worker stopped beating is queued again.
    """
    if Worker.count(queue=queues.queue(connection, queue_name)) == 0:
        print(f"no worker is listening on the {queue_name} queue yet: start `sam-backend worker` "
              "(or `sam-backend serve`, which starts one)", file=out)
    failures: dict[str, str] = {}
    missing: set[str] = set()
    pending = dict(job_ids)
    with tqdm(total=len(job_ids), unit="job", desc=what, file=out) as bar:
        while pending:
            for job_id, name in list(pending.items()):
                job = queues.fetch_job(connection, job_id)
                if job is None and job_id not in missing:
                    missing.add(job_id)  # maybe being replaced right now (delete, then enqueue): look again
                    continue
                if job is None:
                    failures[name] = "lost: its job record vanished from Redis before it finished; run the command again"
                    del pending[job_id]
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
                    continue
                missing.discard(job_id)
                status = job.get_status(refresh=False)
                if status == JobStatus.STARTED and queues.abandoned(connection, job):
                    # workers sweep for these too; this covers the case where none is left alive
                    outcome = queues.requeue_abandoned(connection, [queue_name], max_retries).get(job_id)
                    if outcome:
                        bar.write(f"{name}: its worker died mid-job; {'queued again' if outcome == 'requeued' else 'failed'}")
                    continue
                if status == JobStatus.FAILED:
                    failures[name] = failure_line(job)
                if status in (JobStatus.FINISHED, JobStatus.FAILED):
                    del pending[job_id]
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
                elif on_running is not None:
                    on_running(job, bar)
            if pending:
                time.sleep(poll)
    return failures
