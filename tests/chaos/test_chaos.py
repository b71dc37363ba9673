"""THE chaos test (research/reliability.md §7 anchor 1) on SQLite and PostgreSQL.

Two real crew daemons (`crewguard crew run --workers 3`, echo handler) work through 240 emails
while the test SIGKILLs daemons (and restarts them) and job children at random moments, and
freezes one daemon with its children (SIGSTOP) until the other daemon has reclaimed their
expired leases, then thaws it (SIGCONT): fencing must reject the zombie's late writes.

Invariants: every email ends in exactly one final state, none is lost, at most one ticket and
exactly one "ticket.created" audit entry per ticketed email, the zombie's runs never ticket,
no job child outlives the run, and the audit chain verifies against a fresh checkpoint.
The seed (CREWGUARD_CHAOS_SEED) fixes the sequence of actions; the assertions hold for any timing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from crewguard.crew.ledger import audit, db
from crewguard.crew.ledger.schema import FINAL_EMAIL_STATES, audit_log, emails, review_items, runs, tickets
from crewguard.crew.ledger.schema import jobs as jobs_table
from tests.workers.harness import CrewHarness, is_job_child, wait_until

#: Seed of the chaos schedule; logged so a failing run can be replayed.
SEED = int(os.environ.get("CREWGUARD_CHAOS_SEED", "20261124"))
#: Emails enqueued in total (the first batch before the daemons start, the rest during the chaos).
EMAILS = 240
FIRST_BATCH = 120
BATCH = 15
DAEMONS = 2
WORKERS_PER_DAEMON = 3
#: SIGKILLs (daemons + children) before the chaos stops.
KILLS = 12
#: The freeze happens at this step of the chaos loop, when the queue is busy.
FREEZE_STEP = 2
#: Pause between chaos actions (seconds, drawn uniformly).
PAUSE_S = (0.3, 1.2)
#: Short leases so frozen and killed work comes back fast; attempts high enough that kills never exhaust them.
CHAOS_DB = {
    "lease_s": 2.0,
    "heartbeat_s": 0.4,
    "max_attempts": 10,
    "backoff_base_s": 0.1,
    "backoff_cap_s": 1.0,
}
#: Bounds that turn a stuck run into a failure rather than a hang.
CHAOS_DEADLINE_S = 120.0
DRAIN_DEADLINE_S = 150.0
RECLAIM_DEADLINE_S = 30.0
STOP_DEADLINE_S = 30.0
#: A transaction open this long in a frozen process would block every writer: thaw and retry the freeze.
STUCK_TXN_S = 1.0


@pytest.fixture
def chaos(tmp_path: Path, ledger_url: str) -> Iterator[CrewHarness]:
    url = ledger_url
    if not url.startswith("sqlite"):  # name our connections, to see a frozen one's open transaction
        url += f"&application_name=cgchaos{os.getpid()}"
    h = CrewHarness(tmp_path, url, db_settings=CHAOS_DB, worker_settings={"count": WORKERS_PER_DAEMON})
    yield h
    h.cleanup()


def frozen_transaction_open(h: CrewHarness) -> bool:
    """True when a (frozen) process of ours holds a write lock / transaction open past STUCK_TXN_S."""
    url = h.settings.db_url
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split(":///", 1)[1], timeout=STUCK_TXN_S, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
    app = url.rsplit("application_name=", 1)[1]
    time.sleep(STUCK_TXN_S)
    with h.engine.connect() as conn:
        stuck = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND state <> 'idle' "
                "AND pid <> pg_backend_pid() AND xact_start < now() - make_interval(secs => :s)"
            ),
            {"app": app, "s": STUCK_TXN_S},
        ).scalar_one()
    return stuck > 0


def freeze_and_thaw(h: CrewHarness, daemon: subprocess.Popen[bytes]) -> dict[int, str] | None:
    """SIGSTOP `daemon` and its job children until the other daemon reclaims their jobs; SIGCONT.

    Returns {job id: zombie run id} of the jobs taken over while frozen, or None when the freeze
    proved nothing (no running job, or a frozen process held the database) and should be retried.
    """
    os.kill(daemon.pid, signal.SIGSTOP)
    mark = f":{daemon.pid}:"
    held = [r for r in h.running_children() if mark in (r.lease_owner or "")]
    stopped = [daemon.pid]
    for r in held:
        if is_job_child(r.pid):
            os.kill(r.pid, signal.SIGSTOP)
            stopped.append(r.pid)
    try:
        if not held or frozen_transaction_open(h):
            return None
        zombies = {r.id: r.run_id for r in held}

        def settled() -> bool:
            rows = {r.id: r for r in h.job_rows()}
            return all(
                rows[j].run_id != run or rows[j].state in ("done", "review") for j, run in zombies.items()
            )

        wait_until(settled, RECLAIM_DEADLINE_S, "the other daemon to reclaim the frozen daemon's jobs")
        rows = {r.id: r for r in h.job_rows()}
        taken = {j: run for j, run in zombies.items() if rows[j].run_id != run}
        return taken or None
    finally:
        for pid in reversed(stopped):  # children first, then their daemon
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_chaos_no_email_lost_no_ticket_twice(chaos: CrewHarness) -> None:
    h = chaos
    rng = random.Random(SEED)
    print(f"\nchaos seed {SEED} ({h.settings.db_url.split(':', 1)[0]})")
    t0 = time.monotonic()
    h.enqueue(FIRST_BATCH)
    daemons = [h.start_daemon(workers=WORKERS_PER_DAEMON) for _ in range(DAEMONS)]
    kills: Counter[str] = Counter()
    zombies: dict[int, str] = {}
    freezes_tried = 0
    step = 0
    deadline = time.monotonic() + CHAOS_DEADLINE_S

    while sum(kills.values()) < KILLS or not zombies:
        assert time.monotonic() < deadline, f"chaos did not finish: kills {dict(kills)}, zombies {zombies}"
        for proc in daemons:
            assert proc.poll() is None, f"a daemon died on its own:\n{h.log_of(proc)[-3000:]}"
        time.sleep(rng.uniform(*PAUSE_S))
        if h.enqueued < EMAILS:
            h.enqueue(min(BATCH, EMAILS - h.enqueued))
        step += 1
        if not zombies and step >= FREEZE_STEP:
            freezes_tried += 1
            zombies = freeze_and_thaw(h, daemons[rng.randrange(DAEMONS)]) or {}
            continue
        if sum(kills.values()) >= KILLS:
            continue
        if rng.random() < 0.65:  # a job child, found through the ledger
            victims = [r for r in h.running_children() if is_job_child(r.pid)]
            if victims:
                victim = victims[rng.randrange(len(victims))]
                os.kill(victim.pid, signal.SIGKILL)
                kills["child"] += 1
                continue
        # A daemon, preferably one holding jobs: its fork server exits, its children die with it.
        running = h.running_children()
        holders = [i for i, d in enumerate(daemons) if any(f":{d.pid}:" in r.lease_owner for r in running)]
        i = holders[rng.randrange(len(holders))] if holders else rng.randrange(DAEMONS)
        daemons[i].send_signal(signal.SIGKILL)
        daemons[i].wait(timeout=STOP_DEADLINE_S)
        daemons[i] = h.start_daemon(workers=WORKERS_PER_DAEMON)
        kills["daemon"] += 1

    if h.enqueued < EMAILS:
        h.enqueue(EMAILS - h.enqueued)
    chaos_s = time.monotonic() - t0

    def all_final() -> bool:
        with db.read(h.engine) as conn:
            states = dict(conn.execute(select(emails.c.state, func.count()).group_by(emails.c.state)).all())
        return sum(states.values()) == EMAILS and set(states) <= set(FINAL_EMAIL_STATES)

    wait_until(all_final, DRAIN_DEADLINE_S, "every email to reach a final state")
    for proc in daemons:
        proc.send_signal(signal.SIGTERM)
    for proc in daemons:
        proc.wait(timeout=STOP_DEADLINE_S)
        log = h.log_of(proc)
        # A daemon restarted moments ago may still be importing, before its SIGTERM handler is
        # installed (it logs "crew daemon" right after): then the signal ends it, which is fine.
        started = "crew daemon" in log
        assert proc.returncode == 0 or (not started and proc.returncode == -signal.SIGTERM), log[-3000:]
    wait_until(lambda: not h.leftover_children(), STOP_DEADLINE_S, "no job child to outlive the chaos")
    duration_s = time.monotonic() - t0

    summary = check_invariants(h, zombies)
    summary |= {
        "seed": SEED,
        "kills": dict(kills),
        "freezes_tried": freezes_tried,
        "chaos_s": round(chaos_s, 1),
        "duration_s": round(duration_s, 1),
    }
    print("chaos summary:", json.dumps(summary, sort_keys=True))


def check_invariants(h: CrewHarness, zombies: dict[int, str]) -> dict[str, Any]:
    with db.read(h.engine) as conn:
        email_state = dict(conn.execute(select(emails.c.key, emails.c.state)).all())
        job_rows = list(conn.execute(select(jobs_table)))
        ticket_rows = list(conn.execute(select(tickets.c.email_key, tickets.c.run_id)))
        review_rows = list(conn.execute(select(review_items.c.email_key, review_items.c.reason)))
        run_outcome = dict(conn.execute(select(runs.c.id, runs.c.outcome)).all())
        bodies = [json.loads(b) for (b,) in conn.execute(select(audit_log.c.body).order_by(audit_log.c.seq))]

    # No email lost, each in exactly one final state.
    assert len(email_state) == EMAILS == h.enqueued
    states = Counter(email_state.values())
    assert set(states) <= set(FINAL_EMAIL_STATES), states
    received = Counter(b["email_key"] for b in bodies if b["event"] == "email.received")
    assert set(received) == set(email_state) and set(received.values()) == {1}
    assert len(job_rows) == EMAILS
    assert all(j.state in ("done", "review") and j.lease_owner is None for j in job_rows)

    # At most one ticket per email; one ticket.created audit entry per ticketed email, none otherwise.
    ticketed = {k for k, s in email_state.items() if s == "ticketed"}
    ticket_keys = Counter(k for k, _ in ticket_rows)
    assert set(ticket_keys) == ticketed and set(ticket_keys.values()) <= {1}
    created = Counter(b["email_key"] for b in bodies if b["event"] == "ticket.created")
    assert created == Counter({k: 1 for k in ticketed})
    assert all(run_outcome[run] == "ticketed" for _, run in ticket_rows)
    # A fenced-out worker never reaches the ticket step ("ticket.exists" = a second try at the side effect).
    assert not any(b["event"] == "ticket.exists" for b in bodies)
    in_review = {k for k, s in email_state.items() if s == "in_review"}
    assert {k for k, _ in review_rows} == in_review
    assert all(reason == "attempts_exhausted" for _, reason in review_rows)

    # The frozen daemon's runs were fenced out: lost, never the ticketing run.
    ticket_run = dict(ticket_rows)
    job_key = {j.id: j.email_key for j in job_rows}
    for job_id, zombie_run in zombies.items():
        assert run_outcome[zombie_run] == "lost", (job_id, run_outcome[zombie_run])
        assert ticket_run.get(job_key[job_id]) != zombie_run
    reclaims = [b for b in bodies if b["event"] == "job.claimed" and b["reclaimed"]]
    assert set(zombies.values()) <= {b["previous_run_id"] for b in reclaims}

    # The audit chain verifies against a checkpoint signed now.
    audit.write_checkpoint(
        h.engine, key_path=h.settings.audit_key_path, checkpoint_dir=h.settings.checkpoint_dir
    )
    result = audit.verify_with_settings(h.settings)
    assert result.ok, result.message

    return {
        "emails": dict(states),
        "attempts": dict(sorted(Counter(j.attempts for j in job_rows).items())),
        "runs": dict(Counter(run_outcome.values())),
        "reclaims": len(reclaims),
        "zombie_runs_fenced": len(zombies),
        "audit_entries": result.entries,
    }
