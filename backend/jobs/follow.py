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
    """The last line of a failed job's traceback: the error, not the stack."""
    result = job.latest_result()
    lines = (result.exc_string or "").strip().splitlines() if result else []
    return lines[-1] if lines else "failed"


def follow_jobs(connection: redis.Redis, queue_name: str, job_ids: dict[str, str], what: str, out,
                on_running: Callable[[Job, tqdm], None] | None = None, poll: float = 1.0) -> dict[str, str]:
    """Wait until every job is done or failed; returns {name: error} of the failed ones.

    Each job is read once per round (one snapshot): a finished job is deleted at once
    (result_ttl=0), so gone means done. A started job whose worker stopped beating is queued again.
    """
    if Worker.count(queue=queues.queue(connection, queue_name)) == 0:
        print(f"no worker is listening on the {queue_name} queue yet: start `sam-backend worker` "
              "(or `sam-backend serve`, which starts one)", file=out)
    failures: dict[str, str] = {}
    pending = dict(job_ids)
    with tqdm(total=len(job_ids), unit="job", desc=what, file=out) as bar:
        while pending:
            for job_id, name in list(pending.items()):
                job = queues.fetch_job(connection, job_id)
                status = JobStatus.FINISHED if job is None else job.get_status(refresh=False)
                if status == JobStatus.STARTED and queues.abandoned(connection, job):
                    # enqueue_unique replaces an abandoned job with a fresh one
                    queues.enqueue_unique(connection, queue_name, job.func_name, tuple(job.args), job_id,
                                          job.description or what, job.timeout or 1800)
                    bar.write(f"{name}: its worker died mid-job; queued again")
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
