"""Real processes on one ledger: concurrent claimers, and a claimer SIGKILLed while it holds a lease."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from sqlalchemy import func, select

from crewguard.clock import FakeClock
from crewguard.crew.ledger import db, jobs
from crewguard.crew.ledger.schema import JOB_DONE, runs, tickets
from crewguard.crew.ledger.schema import jobs as jobs_table
from tests.ledger.test_jobs_contract import enqueue

TOTAL_JOBS = 120
WORKER_PROCESSES = 3
#: Short, so the job held by the killed process comes back quickly.
SHORT_LEASE_S = 1.0
#: The workers give up (and the test fails) if the queue is not drained by then.
DRAIN_DEADLINE_S = 120.0
IDLE_POLL_S = 0.05


def drain_worker(url: str, owner: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Claim and complete until every job is done; report the claims made."""
    engine = db.open_engine(url, create=False)
    made: list[tuple[int, int]] = []
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    while time.monotonic() < deadline:
        claim = jobs.claim_next_job(engine, owner, lease_s=SHORT_LEASE_S * 30, host="test")
        if claim is None:
            with db.read(engine) as conn:
                left = conn.execute(
                    select(func.count()).select_from(jobs_table).where(jobs_table.c.state != JOB_DONE)
                ).scalar_one()
            if left == 0:
                break
            time.sleep(IDLE_POLL_S)
            continue
        with db.write(engine) as conn:
            jobs.complete_ticketed(
                conn, claim, sink="helpdesk", team="t", category="c", classifier="llm", external_id=None
            )
        made.append((claim.job_id, claim.attempt))
    engine.dispose()
    out.put(made)


def hold_forever(url: str, ready: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    """Claim one job and hang with it, like a worker that dies mid-job."""
    engine = db.open_engine(url, create=False)
    claim = jobs.claim_next_job(engine, "doomed", lease_s=SHORT_LEASE_S, host="test")
    assert claim is not None
    ready.set()
    while True:
        time.sleep(60)


def test_processes_drain_the_queue_despite_a_killed_claimer(ledger_url: str) -> None:
    engine = db.open_engine(ledger_url)
    for n in range(TOTAL_JOBS):
        enqueue(engine, n, FakeClock(start=1.0))  # in the past: due at once on the real clock
    engine.dispose()  # children open their own connections
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    doomed = ctx.Process(target=hold_forever, args=(ledger_url, ready))
    doomed.start()
    assert ready.wait(30)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    assert doomed.exitcode == -signal.SIGKILL

    out = ctx.Queue()
    workers = [
        ctx.Process(target=drain_worker, args=(ledger_url, f"w{i}", out)) for i in range(WORKER_PROCESSES)
    ]
    for p in workers:
        p.start()
    made = [claim for _ in workers for claim in out.get(timeout=DRAIN_DEADLINE_S + 30)]
    for p in workers:
        p.join(10)
        assert p.exitcode == 0

    assert len(made) == TOTAL_JOBS
    assert len({job_id for job_id, _ in made}) == TOTAL_JOBS  # no job claimed twice by the live workers
    assert sorted(attempt for _, attempt in made).count(2) == 1  # only the dead worker's job ran again
    engine = db.open_engine(ledger_url, create=False)
    with db.read(engine) as conn:
        assert conn.execute(select(func.count()).select_from(tickets)).scalar_one() == TOTAL_JOBS
        outcomes = dict(conn.execute(select(runs.c.outcome, func.count()).group_by(runs.c.outcome)).all())
    engine.dispose()
    assert outcomes == {"ticketed": TOTAL_JOBS, "lost": 1}
