"""Follow queued jobs to the end for a command's --wait: a progress bar (done / total, rate, ETA,
failures), jobs of dead workers and lost jobs queued again, and the failures named at the end."""

from __future__ import annotations

import time
from typing import Callable

import redis
from rq import Worker
from rq.job import Job, JobStatus
from tqdm import tqdm

from backend.jobs import queues

_BATCH = 500  # job records read per round trip


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
    """Wait until every job is done or failed; returns {name: error} of the failed and lost ones.

    Done and gone are told apart: a finished job keeps a short record (queues.RECORD_TTL), so a job
    with no record at all was lost (an evicting, flushed or restarted-empty Redis). A lost job is
    queued again from what the follower last read of it, at most `max_retries` times (jobs are
    idempotent: a warm job of a cached image or a pre-label job of a task with its draft does
    nothing), else it is reported lost; the lost are counted at the end. A started job whose
    worker stopped beating is queued again too (workers sweep for these; this covers the case
    where no worker is left alive).
    """
    if Worker.count(queue=queues.queue(connection, queue_name)) == 0:
        print(f"no worker is listening on the {queue_name} queue yet: start `sam-backend worker` "
              "(or `sam-backend serve`, which starts one)", file=out)
    failures: dict[str, str] = {}
    seen: dict[str, tuple] = {}  # job id -> (function, args, description, timeout): enough to queue it again
    missing: set[str] = set()
    requeued: dict[str, int] = {}  # job id -> times queued again after its record vanished
    lost: set[str] = set()
    pending = dict(job_ids)
    with tqdm(total=len(job_ids), unit="job", desc=what, file=out) as bar:

        def settle(job_id: str, error: str | None) -> None:
            if error is not None:
                failures[pending[job_id]] = error
            del pending[job_id]
            bar.update(1)
            bar.set_postfix(failed=len(failures))

        while pending:
            ids = list(pending)
            for start in range(0, len(ids), _BATCH):
                chunk = ids[start:start + _BATCH]
                for job_id, job in zip(chunk, queues.fetch_jobs(connection, chunk)):
                    name = pending[job_id]
                    if job is None and job_id not in missing:
                        missing.add(job_id)  # maybe being replaced right now (delete, then enqueue): look again
                        continue
                    if job is None:
                        missing.discard(job_id)
                        if job_id in seen and requeued.get(job_id, 0) < max_retries:
                            requeued[job_id] = requeued.get(job_id, 0) + 1
                            function, args, description, timeout = seen[job_id]
                            queues.enqueue_unique(connection, queue_name, function, args, job_id, description, timeout)
                            bar.write(f"{name}: its job record vanished from Redis before it finished; queued again",
                                      file=out)
                            continue
                        lost.add(job_id)
                        again = f" (queued again {requeued[job_id]} times)" if job_id in requeued else ""
                        settle(job_id, f"lost: its job record vanished from Redis before it finished{again}; "
                                       "run the command again")
                        continue
                    missing.discard(job_id)
                    seen[job_id] = (job.func_name, tuple(job.args), job.description or job_id, job.timeout or 1800)
                    status = job.get_status(refresh=False)
                    if status == JobStatus.STARTED and queues.abandoned(connection, job):
                        outcome = queues.requeue_abandoned(connection, [queue_name], max_retries).get(job_id)
                        if outcome:
                            bar.write(f"{name}: its worker died mid-job; "
                                      f"{'queued again' if outcome == 'requeued' else 'failed'}", file=out)
                        continue
                    if status == JobStatus.FAILED:
                        settle(job_id, failure_line(job))
                    elif status == JobStatus.FINISHED:
                        settle(job_id, None)
                    elif on_running is not None:
                        on_running(job, bar)
            if pending:
                time.sleep(poll)
    vanished = set(requeued) | lost
    if vanished:
        print(f"{len(vanished)} of {len(job_ids)} jobs vanished from Redis without a record of finishing: "
              f"{len(vanished - lost)} queued again, {len(lost)} lost. Is the job store's Redis "
              "evicting or being flushed? It needs maxmemory-policy noeviction and persistence (see the "
              "warnings logged at start).", file=out)
    return failures
