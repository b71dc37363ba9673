"""Contract of the ledger's job machinery, run on SQLite and PostgreSQL (the `ledger_url` fixture)."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select

from crewguard.clock import FakeClock
from crewguard.crew.ledger import db, jobs, queries, review
from crewguard.crew.ledger.jobs import Claim, LeaseLost
from crewguard.crew.ledger.schema import (
    audit_log,
    emails,
    heartbeats,
    incidents,
    review_items,
    runs,
    tickets,
)
from crewguard.crew.ledger.schema import (
    jobs as jobs_table,
)
from crewguard.retry import RetryPolicy

LEASE_S = 30.0
POLICY = RetryPolicy(max_attempts=3, base_s=2.0, cap_s=60.0)


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    eng = db.open_engine(ledger_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def key(n: int) -> str:
    return f"{n:064x}"


def enqueue(
    engine: Engine, n: int, clock: FakeClock, *, max_attempts: int = 3, parse_error: str | None = None
) -> bool:
    with db.write(engine) as conn:
        return jobs.enqueue_email(
            conn,
            key=key(n),
            raw=f"Subject: email {n}\r\n\r\nbody {n}".encode(),
            source="file",
            source_ref=f"/tmp/{n}.eml",
            message_id=f"<{n}@example.com>",
            subject=f"email {n}",
            sender="someone@example.com",
            parse_error=parse_error,
            max_attempts=max_attempts,
            clock=clock,
        )


def claim(engine: Engine, owner: str, clock: FakeClock, lease_s: float = LEASE_S) -> Claim | None:
    return jobs.claim_next_job(engine, owner, lease_s=lease_s, host="test-host", clock=clock)


def complete(engine: Engine, c: Claim, clock: FakeClock, team: str = "billing") -> bool:
    with db.write(engine) as conn:
        return jobs.complete_ticketed(
            conn,
            c,
            sink="helpdesk",
            team=team,
            category="invoice",
            classifier="llm",
            external_id=None,
            clock=clock,
        )


def audit_events(engine: Engine, email_key: str | None = None) -> Counter[str]:
    with db.read(engine) as conn:
        bodies = [json.loads(b) for b in conn.execute(select(audit_log.c.body)).scalars()]
    return Counter(b["event"] for b in bodies if email_key is None or b["email_key"] == email_key)


def row(engine: Engine, table, where):  # type: ignore[no-untyped-def]
    with db.read(engine) as conn:
        return conn.execute(select(table).where(where)).one()


def count(engine: Engine, table, *where) -> int:  # type: ignore[no-untyped-def]
    with db.read(engine) as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def job_of(engine: Engine, n: int):  # type: ignore[no-untyped-def]
    return row(engine, jobs_table, jobs_table.c.email_key == key(n))


def email_state(engine: Engine, n: int) -> str:
    return row(engine, emails, emails.c.key == key(n)).state


# --------------------------------------------------------------------------- enqueue


def test_enqueue_dedupes_the_same_key(engine: Engine, clock: FakeClock) -> None:
    assert enqueue(engine, 1, clock) is True
    assert enqueue(engine, 1, clock) is False
    assert count(engine, emails) == 1
    assert count(engine, jobs_table) == 1
    job = job_of(engine, 1)
    assert (job.state, job.attempts, job.available_at) == ("queued", 0, clock.now())
    assert email_state(engine, 1) == "queued"
    assert audit_events(engine) == Counter({"email.received": 1})


def test_concurrent_enqueue_of_one_key_stores_it_once(engine: Engine, clock: FakeClock) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(enqueue(engine, 7, clock))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert count(engine, jobs_table) == 1
    assert audit_events(engine)["email.received"] == 1


def test_parse_error_goes_to_review_at_once(engine: Engine, clock: FakeClock) -> None:
    assert enqueue(engine, 1, clock, parse_error="no headers") is True
    assert email_state(engine, 1) == "in_review"
    assert job_of(engine, 1).state == "review"
    item = row(engine, review_items, review_items.c.email_key == key(1))
    assert (item.reason, item.detail, item.state) == ("unparseable", "no headers", "open")
    assert claim(engine, "w1", clock) is None
    assert audit_events(engine) == Counter({"email.received": 1, "review.opened": 1})


# --------------------------------------------------------------------------- claim


def test_claim_takes_the_oldest_due_job_first(engine: Engine, clock: FakeClock) -> None:
    for n in (1, 2, 3):
        enqueue(engine, n, clock)
        clock.advance(1)
    c1 = claim(engine, "w1", clock)
    assert c1 is not None and c1.email_key == key(1) and c1.attempt == 1 and c1.max_attempts == 3
    c2 = claim(engine, "w1", clock)
    assert c2 is not None and c2.email_key == key(2)
    # Job 2 fails and backs off into the future (seeded: a delay > 0): job 3 comes first.
    rng = random.Random(42)
    assert (
        jobs.fail_attempt(engine, c2, error="x", retryable=True, policy=POLICY, clock=clock, rng=rng)
        == "retry"
    )
    due = job_of(engine, 2).available_at
    assert due > clock.now()
    c3 = claim(engine, "w1", clock)
    assert c3 is not None and c3.email_key == key(3)
    assert claim(engine, "w1", clock) is None
    clock.t = due
    again = claim(engine, "w1", clock)
    assert again is not None and again.email_key == key(2) and again.attempt == 2
    assert claim(engine, "w1", clock) is None


def test_claim_records_run_lease_and_states(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    job = job_of(engine, 1)
    assert job.state == "running" and job.lease_owner == "w1" and job.attempts == 1
    assert job.lease_expires_at == clock.now() + LEASE_S and job.run_id == c.run_id
    run = row(engine, runs, runs.c.id == c.run_id)
    assert (run.attempt, run.worker, run.host, run.started_at, run.ended_at) == (
        1,
        "w1",
        "test-host",
        clock.now(),
        None,
    )
    assert email_state(engine, 1) == "running"
    jobs.record_child(engine, c, pid=4242, pgid=4242, host="test-host")
    job = job_of(engine, 1)
    assert (job.pid, job.pgid) == (4242, 4242)
    assert row(engine, runs, runs.c.id == c.run_id).pid == 4242
    assert audit_events(engine)["job.claimed"] == 1


def test_expired_lease_is_reclaimed_with_the_next_attempt(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    old = claim(engine, "w1", clock)
    assert old is not None
    clock.advance(LEASE_S - 1)
    assert claim(engine, "w2", clock) is None  # lease still valid
    clock.advance(2)
    new = claim(engine, "w2", clock)
    assert new is not None and new.job_id == old.job_id and new.attempt == 2 and new.owner == "w2"
    assert new.run_id != old.run_id
    lost = row(engine, runs, runs.c.id == old.run_id)
    assert lost.outcome == "lost" and lost.ended_at == clock.now()
    assert audit_events(engine)["job.claimed"] == 2


def test_renewed_lease_is_not_reclaimed(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    clock.advance(LEASE_S - 1)
    assert jobs.renew_leases(engine, "w1", [c], lease_s=LEASE_S, clock=clock) == []
    clock.advance(LEASE_S - 1)
    assert claim(engine, "w2", clock) is None
    assert job_of(engine, 1).lease_expires_at == clock.now() + 1


def test_fencing_rejects_the_old_owner_after_reclaim(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    old = claim(engine, "w1", clock)
    assert old is not None
    clock.advance(LEASE_S + 1)
    new = claim(engine, "w2", clock)
    assert new is not None
    with pytest.raises(LeaseLost):
        complete(engine, old, clock)
    assert count(engine, tickets) == 0
    assert jobs.renew_leases(engine, "w1", [old], lease_s=LEASE_S, clock=clock) == [old]
    with pytest.raises(LeaseLost):
        jobs.record_child(engine, old, pid=1, pgid=1, host="h")
    with pytest.raises(LeaseLost):
        jobs.fail_attempt(engine, old, error="late", retryable=True, policy=POLICY, clock=clock)
    with pytest.raises(LeaseLost), db.write(engine) as conn:
        jobs.send_to_review(conn, old, email_key=old.email_key, reason="unclassified")
    # Same owner name but the old attempt number is fenced out too.
    same_owner_old_attempt = Claim(new.job_id, new.email_key, "w2", 1, new.max_attempts, old.run_id)
    with pytest.raises(LeaseLost):
        complete(engine, same_owner_old_attempt, clock)
    assert job_of(engine, 1).state == "running"
    assert complete(engine, new, clock) is True
    assert count(engine, tickets) == 1
    assert email_state(engine, 1) == "ticketed"


# --------------------------------------------------------------------------- outcomes


def test_complete_ticketed_finishes_everything(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    clock.advance(5)
    assert complete(engine, c, clock) is True
    job = job_of(engine, 1)
    assert job.state == "done" and job.lease_owner is None
    run = row(engine, runs, runs.c.id == c.run_id)
    assert (run.outcome, run.classifier, run.team, run.category, run.wall_s) == (
        "ticketed",
        "llm",
        "billing",
        "invoice",
        5.0,
    )
    ticket = row(engine, tickets, tickets.c.email_key == key(1))
    assert ticket.idempotency_key == f"{key(1)}:ticket" and ticket.run_id == c.run_id
    assert email_state(engine, 1) == "ticketed"
    events = audit_events(engine, key(1))
    assert events["ticket.created"] == 1 and events["email.ticketed"] == 1
    assert queries.list_tickets(engine)[0]["team"] == "billing"


def test_complete_ticketed_never_makes_a_second_ticket(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    assert complete(engine, c, clock) is True
    with pytest.raises(LeaseLost):  # the same claim again: the job is done
        complete(engine, c, clock)
    # An earlier attempt recorded the ticket (e.g. a zombie child); the reclaimed attempt completes.
    enqueue(engine, 2, clock)
    first = claim(engine, "w1", clock)
    assert first is not None
    with db.write(engine) as conn:
        jobs.insert_ignoring_conflict(
            conn,
            tickets,
            {
                "idempotency_key": f"{key(2)}:ticket",
                "email_key": key(2),
                "sink": "salesforce",
                "team": "sales",
                "category": "lead",
                "classifier": "llm",
                "external_id": "500X",
                "run_id": first.run_id,
                "created_at": clock.now(),
            },
        )
    clock.advance(LEASE_S + 1)
    second = claim(engine, "w2", clock)
    assert second is not None and second.attempt == 2
    assert complete(engine, second, clock, team="billing") is False
    kept = row(engine, tickets, tickets.c.email_key == key(2))
    assert (kept.team, kept.run_id, kept.external_id) == ("sales", first.run_id, "500X")
    assert count(engine, tickets) == 2  # one per email
    assert email_state(engine, 2) == "ticketed"
    assert audit_events(engine, key(2))["ticket.exists"] == 1


def test_backoff_requeues_within_the_cap(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    expected = POLICY.backoff(1, random.Random(42))
    assert (
        jobs.fail_attempt(
            engine, c, error="HTTP 503", retryable=True, policy=POLICY, clock=clock, rng=random.Random(42)
        )
        == "retry"
    )
    job = job_of(engine, 1)
    assert job.state == "queued" and job.lease_owner is None and job.last_error == "HTTP 503"
    assert clock.now() <= job.available_at <= clock.now() + min(POLICY.cap_s, POLICY.base_s)
    assert job.available_at == pytest.approx(clock.now() + expected)
    assert email_state(engine, 1) == "queued"
    run = row(engine, runs, runs.c.id == c.run_id)
    assert (run.outcome, run.error) == ("error", "HTTP 503")
    assert audit_events(engine, key(1))["job.retry"] == 1
    # Later attempts back off within the cap too.
    big = RetryPolicy(max_attempts=10, base_s=2.0, cap_s=5.0)
    clock.t = job.available_at
    c2 = claim(engine, "w1", clock)
    assert c2 is not None
    jobs.fail_attempt(engine, c2, error="x", retryable=True, policy=big, clock=clock, rng=random.Random(1))
    assert clock.now() <= job_of(engine, 1).available_at <= clock.now() + 5.0


def test_last_attempt_goes_to_review(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock, max_attempts=2)
    for attempt in (1, 2):
        clock.advance(POLICY.cap_s)
        c = claim(engine, "w1", clock)
        assert c is not None and c.attempt == attempt
        outcome = jobs.fail_attempt(
            engine, c, error="timeout", retryable=True, policy=POLICY, clock=clock, rng=random.Random(0)
        )
        assert outcome == ("retry" if attempt == 1 else "review")
    item = row(engine, review_items, review_items.c.email_key == key(1))
    assert (item.reason, item.detail, item.state, item.run_id) == (
        "attempts_exhausted",
        "timeout",
        "open",
        c.run_id,
    )
    assert job_of(engine, 1).state == "review" and email_state(engine, 1) == "in_review"
    assert row(engine, runs, runs.c.id == c.run_id).outcome == "error"  # the run keeps its own outcome
    clock.advance(3600)
    assert claim(engine, "w1", clock) is None  # review items never expire back into the queue
    events = audit_events(engine, key(1))
    assert events["job.retry"] == 1 and events["review.opened"] == 1


def test_permanent_error_goes_to_review_at_once(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    assert (
        jobs.fail_attempt(engine, c, error="bad config", retryable=False, policy=POLICY, clock=clock)
        == "review"
    )
    assert row(engine, review_items, review_items.c.email_key == key(1)).reason == "permanent_error"


def test_expired_last_attempt_becomes_a_review_item(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock, max_attempts=1)
    clock.advance(1)
    enqueue(engine, 2, clock)
    dead = claim(engine, "w1", clock)
    assert dead is not None and dead.email_key == key(1)
    clock.advance(LEASE_S + 1)
    nxt = claim(engine, "w2", clock)  # skips the exhausted job, takes the next one
    assert nxt is not None and nxt.email_key == key(2)
    item = row(engine, review_items, review_items.c.email_key == key(1))
    assert (item.reason, item.detail) == ("attempts_exhausted", "lease expired: worker died")
    assert row(engine, runs, runs.c.id == dead.run_id).outcome == "lost"
    assert job_of(engine, 1).state == "review" and email_state(engine, 1) == "in_review"
    assert audit_events(engine, key(1))["review.opened"] == 1


def test_send_to_review_is_idempotent(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    with db.write(engine) as conn:
        first = jobs.send_to_review(conn, c, email_key=key(1), reason="unclassified", clock=clock)
    with db.write(engine) as conn:
        second = jobs.send_to_review(conn, None, email_key=key(1), reason="unclassified", clock=clock)
    assert first == second
    assert count(engine, review_items) == 1
    assert row(engine, runs, runs.c.id == c.run_id).outcome == "review"
    assert audit_events(engine, key(1))["review.opened"] == 1


# --------------------------------------------------------------------------- kills


def test_kill_request_and_finish(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    enqueue(engine, 2, clock)
    assert jobs.request_kill(engine, job_of(engine, 1).id, reason="loop", clock=clock) is False  # queued
    c = claim(engine, "w1", clock)
    assert c is not None and c.email_key == key(1)
    assert jobs.kill_requests_for(engine, "w1") == []
    assert jobs.request_kill(engine, c.job_id, reason="loop detected", incident_id=9, clock=clock) is True
    job = job_of(engine, 1)
    assert (job.kill_requested_at, job.kill_reason, job.kill_incident_id) == (clock.now(), "loop detected", 9)
    clock.advance(1)
    assert jobs.request_kill(engine, c.job_id, reason="again", clock=clock) is True  # keeps the first
    assert job_of(engine, 1).kill_reason == "loop detected"
    [req] = jobs.kill_requests_for(engine, "w1")
    assert (req.job_id, req.attempt, req.run_id, req.reason, req.incident_id) == (
        c.job_id,
        1,
        c.run_id,
        "loop detected",
        9,
    )
    assert jobs.kill_requests_for(engine, "w2") == []
    item_id = jobs.finish_killed(engine, c, reason="loop detected", incident_id=9, clock=clock)
    item = row(engine, review_items, review_items.c.id == item_id)
    assert (item.reason, item.detail, item.incident_id) == ("killed", "loop detected", 9)
    assert row(engine, runs, runs.c.id == c.run_id).outcome == "killed"
    assert email_state(engine, 1) == "in_review"
    assert jobs.kill_requests_for(engine, "w1") == []
    events = audit_events(engine, key(1))
    assert events["job.kill_requested"] == 1 and events["job.killed"] == 1 and events["review.opened"] == 1


def test_killed_job_whose_owner_died_goes_to_review(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    c = claim(engine, "w1", clock)
    assert c is not None
    jobs.request_kill(engine, c.job_id, reason="token spike", incident_id=3, clock=clock)
    clock.advance(LEASE_S + 1)
    assert claim(engine, "w2", clock) is None  # not run again
    item = row(engine, review_items, review_items.c.email_key == key(1))
    assert (item.reason, item.incident_id) == ("killed", 3)
    assert row(engine, runs, runs.c.id == c.run_id).outcome == "killed"


# --------------------------------------------------------------------------- concurrency


def test_concurrent_claimers_never_share_a_job(ledger_url: str) -> None:
    total, workers = 200, 4
    engines = [db.open_engine(ledger_url) for _ in range(workers)]
    seed = FakeClock(start=1.0)  # enqueued in the past: every job is due on the real clock
    for n in range(total):
        enqueue(engines[0], n, seed)
    claimed: list[list[Claim]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def run(i: int) -> None:
        try:
            barrier.wait()
            while (c := jobs.claim_next_job(engines[i], f"w{i}", lease_s=600)) is not None:
                claimed[i].append(c)
                with db.write(engines[i]) as conn:
                    jobs.complete_ticketed(
                        conn, c, sink="helpdesk", team="t", category="c", classifier="llm", external_id=None
                    )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for eng in engines[1:]:
        eng.dispose()
    assert errors == []
    every = [c for per in claimed for c in per]
    assert len(every) == total
    assert len({c.job_id for c in every}) == total
    assert {c.attempt for c in every} == {1}
    assert count(engines[0], tickets) == total
    assert audit_events(engines[0])["job.claimed"] == total
    engines[0].dispose()


# --------------------------------------------------------------------------- review queue


def open_review_item(engine: Engine, n: int, clock: FakeClock) -> int:
    enqueue(engine, n, clock)
    c = claim(engine, "w1", clock)
    assert c is not None and c.email_key == key(n)
    with db.write(engine) as conn:
        return jobs.send_to_review(conn, c, email_key=key(n), reason="unclassified", clock=clock)


def test_resolve_review_tickets_by_hand(engine: Engine, clock: FakeClock) -> None:
    item_id = open_review_item(engine, 1, clock)
    [listed] = review.list_review(engine)
    assert listed["id"] == item_id and listed["subject"] == "email 1" and listed["reason"] == "unclassified"
    shown = review.get_review(engine, item_id)
    assert shown is not None and len(shown["runs"]) == 1 and shown["runs"][0]["outcome"] == "review"
    assert review.get_review(engine, 999) is None
    clock.advance(10)
    result = review.resolve_review(engine, item_id, team="support", category="howto", by="alice", clock=clock)
    assert result["state"] == "resolved" and result["resolution"] == "support" and result["ticket_created"]
    ticket = row(engine, tickets, tickets.c.email_key == key(1))
    assert (ticket.team, ticket.category, ticket.classifier, ticket.sink) == (
        "support",
        "howto",
        "human",
        "helpdesk",
    )
    assert email_state(engine, 1) == "resolved" and job_of(engine, 1).state == "done"
    assert review.list_review(engine) == []
    assert len(review.list_review(engine, None)) == 1
    with pytest.raises(ValueError, match="already resolved"):
        review.resolve_review(engine, item_id, team="support", clock=clock)
    with pytest.raises(ValueError, match="does not exist"):
        review.resolve_review(engine, 999, team="support", clock=clock)
    assert count(engine, tickets) == 1
    assert audit_events(engine, key(1))["review.resolved"] == 1


def test_resolve_review_keeps_an_existing_ticket(engine: Engine, clock: FakeClock) -> None:
    item_id = open_review_item(engine, 1, clock)
    with db.write(engine) as conn:
        jobs.insert_ignoring_conflict(
            conn,
            tickets,
            {
                "idempotency_key": f"{key(1)}:ticket",
                "email_key": key(1),
                "sink": "salesforce",
                "team": "sales",
                "category": "lead",
                "classifier": "llm",
                "created_at": clock.now(),
            },
        )
    result = review.resolve_review(engine, item_id, team="support", clock=clock)
    assert result["ticket_created"] is False and result["ticket"]["team"] == "sales"
    assert count(engine, tickets) == 1


def test_requeue_review_runs_the_email_again(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock, max_attempts=1)
    c = claim(engine, "w1", clock)
    assert c is not None
    jobs.fail_attempt(engine, c, error="boom", retryable=True, policy=POLICY, clock=clock)
    [item] = review.list_review(engine)
    result = review.requeue_review(engine, item["id"], clock=clock)
    assert result["state"] == "requeued"
    job = job_of(engine, 1)
    assert (job.state, job.attempts, job.available_at) == ("queued", 0, clock.now())
    assert email_state(engine, 1) == "queued"
    again = claim(engine, "w1", clock)
    assert again is not None and again.attempt == 1
    with pytest.raises(ValueError, match="already requeued"):
        review.requeue_review(engine, item["id"], clock=clock)
    assert audit_events(engine, key(1))["review.requeued"] == 1


# --------------------------------------------------------------------------- status


def test_status_snapshot_counts(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock)
    ticketed = claim(engine, "w1", clock)
    assert ticketed is not None
    complete(engine, ticketed, clock)
    review.resolve_review(engine, open_review_item(engine, 2, clock), team="support", clock=clock)
    open_review_item(engine, 3, clock)
    enqueue(engine, 4, clock)
    running = claim(engine, "w2", clock)
    assert running is not None and running.email_key == key(4)
    queued_at = clock.now()
    enqueue(engine, 5, clock)
    enqueue(engine, 6, clock)
    with db.write(engine) as conn:
        jobs.update_run_usage(
            conn, running.run_id, llm_calls=2, prompt_tokens=100, completion_tokens=20, cost_usd=0.5
        )
        jobs.update_run_usage(conn, running.run_id, llm_calls=1, prompt_tokens=10, progress_at=clock.now())
        conn.execute(heartbeats.insert().values(component="supervisor", host="h", pid=1, at=clock.now()))
        conn.execute(
            incidents.insert().values(
                dedupe_key="loop:x",
                kind="loop",
                severity="warning",
                summary="loop",
                state="open",
                count=1,
                opened_at=clock.now(),
                last_seen_at=clock.now(),
            )
        )
    clock.advance(7)
    snap = queries.status_snapshot(engine, clock=clock)
    assert snap["emails"] == {
        "total": 6,
        "queued": 2,
        "running": 1,
        "ticketed": 1,
        "in_review": 1,
        "resolved": 1,
    }
    assert snap["queue"] == {"depth": 2, "ready": 2, "oldest_age_s": clock.now() - queued_at}
    [r] = snap["running"]
    assert (r["job_id"], r["email_key"], r["attempt"], r["owner"], r["run_id"]) == (
        running.job_id,
        running.email_key,
        1,
        "w2",
        running.run_id,
    )
    assert (r["llm_calls"], r["prompt_tokens"], r["completion_tokens"], r["cost_usd"]) == (3, 110, 20, 0.5)
    assert snap["review"] == {"open": 1, "oldest_age_s": 7.0}
    assert snap["incidents_open"] == 1
    assert snap["supervisor"] == {"last_heartbeat_at": clock.now() - 7, "age_s": 7.0}
    assert snap["runs"] == {"total": 4, "llm_calls": 3, "tokens": 130, "cost_usd": 0.5}


def test_audit_entries_hold_no_email_content(engine: Engine, clock: FakeClock) -> None:
    enqueue(engine, 1, clock, max_attempts=2)
    c = claim(engine, "w1", clock)
    assert c is not None
    long_error = "E" * 10_000
    jobs.fail_attempt(engine, c, error=long_error, retryable=True, policy=POLICY, clock=clock)
    clock.advance(POLICY.cap_s)
    c2 = claim(engine, "w1", clock)
    assert c2 is not None
    complete(engine, c2, clock)
    with db.read(engine) as conn:
        bodies = list(conn.execute(select(audit_log.c.body)).scalars())
    assert len(bodies) == 6  # received, claimed, retry, claimed, ticket.created, email.ticketed
    for body in bodies:
        assert "body 1" not in body and "email 1" not in body and "someone@example.com" not in body
        assert "E" * (jobs.SHORT_TEXT_CHARS + 1) not in body
    assert len(job_of(engine, 1).last_error) <= jobs.STORED_ERROR_CHARS
