"""The durable job queue: enqueue, claim with a lease, renew, fence, complete, retry, review, kill.

Every state change of an email happens in one transaction together with its audit entry.
Completion and every side-effect record are fenced on (lease owner, attempt): a worker whose
lease was taken over can no longer change anything (DESIGN.md decisions 1, 2, 6).

Lock order on PostgreSQL (to rule out deadlocks): job row, then email/run/review rows, then
the audit log's lock (taken by `audit.append`, always last in a transaction).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, and_, or_, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import audit, db
from crewguard.crew.ledger.schema import (
    EMAIL_IN_REVIEW,
    EMAIL_QUEUED,
    EMAIL_RUNNING,
    EMAIL_TICKETED,
    JOB_DONE,
    JOB_QUEUED,
    JOB_REVIEW,
    JOB_RUNNING,
    emails,
    jobs,
    review_items,
    runs,
    tickets,
)
from crewguard.retry import RetryPolicy

#: Audit entries keep at most this many characters of an error message or reason.
SHORT_TEXT_CHARS = 200
#: Runs and jobs keep at most this many characters of an error (tracebacks can be huge).
STORED_ERROR_CHARS = 4000
#: Review item states.
REVIEW_OPEN = "open"
REVIEW_RESOLVED = "resolved"
REVIEW_REQUEUED = "requeued"
#: Review reasons set by this module (others, e.g. "unclassified", come from the flow).
REASON_UNPARSEABLE = "unparseable"
REASON_ATTEMPTS_EXHAUSTED = "attempts_exhausted"
REASON_PERMANENT_ERROR = "permanent_error"
REASON_KILLED = "killed"
#: Detail of the review item opened when the last attempt's worker vanished.
LEASE_EXPIRED_DETAIL = "lease expired: worker died"
#: Run outcomes.
OUTCOME_TICKETED = "ticketed"
OUTCOME_REVIEW = "review"
OUTCOME_ERROR = "error"
OUTCOME_KILLED = "killed"
OUTCOME_LOST = "lost"


@dataclass(frozen=True)
class Claim:
    """A job held under lease by `owner` for attempt number `attempt` (1-based) in run `run_id`."""

    job_id: int
    email_key: str
    owner: str
    attempt: int
    max_attempts: int
    run_id: str


@dataclass(frozen=True)
class KillRequest:
    """A kill the supervisor asked for on a job that `owner` runs."""

    job_id: int
    email_key: str
    attempt: int
    run_id: str | None
    reason: str | None
    incident_id: int | None
    requested_at: float


class LeaseLost(Exception):
    """Fencing failed: the job is no longer running under this owner and attempt."""


def short(text: str | None, limit: int = SHORT_TEXT_CHARS) -> str | None:
    """An error message cut to `limit` characters, for audit entries."""
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


def insert_ignoring_conflict(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL; True when a row was inserted."""
    if db.is_sqlite(conn):
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    # RETURNING, not rowcount: psycopg reports rowcount -1 for this statement.
    stmt = insert(table).values(**values).on_conflict_do_nothing().returning(*table.primary_key.columns)
    return conn.execute(stmt).first() is not None


def _for_update(conn: Connection, stmt: Any, *, skip_locked: bool = False) -> Any:
    """Row locks on PostgreSQL; SQLite's BEGIN IMMEDIATE already serializes writers."""
    if db.is_sqlite(conn):
        return stmt
    return stmt.with_for_update(skip_locked=skip_locked)


# --------------------------------------------------------------------------- enqueue


def enqueue_email(
    conn: Connection,
    *,
    key: str,
    raw: bytes,
    source: str,
    source_ref: str | None,
    message_id: str | None,
    subject: str | None,
    sender: str | None,
    parse_error: str | None,
    max_attempts: int,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Record a new email and its job inside the caller's transaction; False if the key exists.

    An email that could not be parsed (`parse_error`) goes straight to review ("unparseable").
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    now = clock.now()
    inserted = insert_ignoring_conflict(
        conn,
        emails,
        {
            "key": key,
            "message_id": message_id,
            "subject": subject,
            "sender": sender,
            "source": source,
            "source_ref": source_ref,
            "raw": raw,
            "size": len(raw),
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
            "parse_error": parse_error,
            "state": EMAIL_QUEUED,
            "received_at": now,
            "updated_at": now,
        },
    )
    if not inserted:
        return False
    job_id = conn.execute(
        jobs.insert()
        .values(
            email_key=key,
            state=JOB_QUEUED,
            attempts=0,
            max_attempts=max_attempts,
            available_at=now,
            created_at=now,
            updated_at=now,
        )
        .returning(jobs.c.id)
    ).scalar_one()
    audit.append(
        conn, "email.received", email_key=key, clock=clock, source=source, job_id=job_id, size=len(raw)
    )
    if parse_error is not None:
        send_to_review(conn, None, email_key=key, reason=REASON_UNPARSEABLE, detail=parse_error, clock=clock)
    return True


# --------------------------------------------------------------------------- claim / lease


def claim_next_job(
    engine: Engine,
    owner: str,
    *,
    lease_s: float,
    host: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
) -> Claim | None:
    """Claim the oldest runnable job (queued and due, or running with an expired lease), or None.

    `owner` names the worker (unique per process), `lease_s` is the lease length, `host` is
    recorded for the supervisor. `rng` is accepted for symmetry with `fail_attempt` (unused).
    A job whose lease expired after its last attempt goes to review instead; one whose kill was
    requested goes to review as "killed" (the supervisor judged that run runaway).
    """
    del rng
    with db.write(engine) as conn:
        now = clock.now()
        while True:
            row = _next_candidate(conn, now)
            if row is None:
                return None
            if row.state == JOB_RUNNING:  # its lease expired: the worker died or hung
                if row.kill_requested_at is not None:
                    _close_run(conn, row.run_id, OUTCOME_KILLED, now, error=LEASE_EXPIRED_DETAIL)
                    send_to_review(
                        conn,
                        None,
                        email_key=row.email_key,
                        reason=REASON_KILLED,
                        detail=row.kill_reason,
                        incident_id=row.kill_incident_id,
                        clock=clock,
                    )
                    continue
                _close_run(conn, row.run_id, OUTCOME_LOST, now, error=LEASE_EXPIRED_DETAIL)
                if row.attempts >= row.max_attempts:
                    send_to_review(
                        conn,
                        None,
                        email_key=row.email_key,
                        reason=REASON_ATTEMPTS_EXHAUSTED,
                        detail=LEASE_EXPIRED_DETAIL,
                        clock=clock,
                    )
                    continue
            return _take(conn, row, owner=owner, lease_s=lease_s, host=host, now=now, clock=clock)


def _next_candidate(conn: Connection, now: float) -> Row[Any] | None:
    due = or_(
        and_(jobs.c.state == JOB_QUEUED, jobs.c.available_at <= now),
        and_(jobs.c.state == JOB_RUNNING, jobs.c.lease_expires_at < now),
    )
    stmt = select(jobs).where(due).order_by(jobs.c.available_at, jobs.c.id).limit(1)
    return conn.execute(_for_update(conn, stmt, skip_locked=True)).first()


def _take(
    conn: Connection, row: Row[Any], *, owner: str, lease_s: float, host: str | None, now: float, clock: Clock
) -> Claim:
    attempt = row.attempts + 1
    run_id = str(uuid.uuid4())
    conn.execute(
        jobs.update()
        .where(jobs.c.id == row.id)
        .values(
            state=JOB_RUNNING,
            attempts=attempt,
            lease_owner=owner,
            lease_expires_at=now + lease_s,
            host=host,
            pid=None,
            pgid=None,
            run_id=run_id,
            kill_requested_at=None,
            kill_reason=None,
            kill_incident_id=None,
            updated_at=now,
        )
    )
    conn.execute(
        runs.insert().values(
            id=run_id,
            job_id=row.id,
            email_key=row.email_key,
            attempt=attempt,
            worker=owner,
            host=host,
            started_at=now,
            last_progress_at=now,
            llm_calls=0,
            tool_calls=0,
            prompt_tokens=0,
            completion_tokens=0,
            cost_usd=0.0,
        )
    )
    _set_email_state(conn, row.email_key, EMAIL_RUNNING, now)
    audit.append(
        conn,
        "job.claimed",
        email_key=row.email_key,
        clock=clock,
        job_id=row.id,
        attempt=attempt,
        owner=owner,
        run_id=run_id,
        reclaimed=row.state == JOB_RUNNING,
        previous_run_id=row.run_id,
    )
    return Claim(
        job_id=row.id,
        email_key=row.email_key,
        owner=owner,
        attempt=attempt,
        max_attempts=row.max_attempts,
        run_id=run_id,
    )


def renew_leases(
    engine: Engine, owner: str, claims: Sequence[Claim], *, lease_s: float, clock: Clock = SYSTEM_CLOCK
) -> list[Claim]:
    """Extend the leases of `claims` (the worker's heartbeat); returns the claims that were lost."""
    if not claims:
        return []
    lost: list[Claim] = []
    with db.write(engine) as conn:
        now = clock.now()
        for claim in claims:
            result = conn.execute(
                jobs.update()
                .where(_held_by(claim, owner))
                .values(lease_expires_at=now + lease_s, updated_at=now)
            )
            if result.rowcount != 1:
                lost.append(claim)
    return lost


def _held_by(claim: Claim, owner: str | None = None) -> Any:
    return and_(
        jobs.c.id == claim.job_id,
        jobs.c.state == JOB_RUNNING,
        jobs.c.lease_owner == (owner or claim.owner),
        jobs.c.attempts == claim.attempt,
    )


def fence(conn: Connection, claim: Claim) -> None:
    """Raise LeaseLost unless `claim` still holds its job (locks the job row on PostgreSQL)."""
    stmt = select(jobs.c.state, jobs.c.lease_owner, jobs.c.attempts).where(jobs.c.id == claim.job_id)
    row = conn.execute(_for_update(conn, stmt)).first()
    if row is None:
        raise LeaseLost(f"job {claim.job_id} does not exist")
    if row.state != JOB_RUNNING or row.lease_owner != claim.owner or row.attempts != claim.attempt:
        raise LeaseLost(
            f"job {claim.job_id} attempt {claim.attempt} of {claim.owner!r} was fenced out "
            f"(now {row.state}, owner {row.lease_owner!r}, attempt {row.attempts})"
        )


def record_child(engine: Engine, claim: Claim, *, pid: int, pgid: int, host: str) -> None:
    """Record the child process running `claim` (fenced), so it can be killed by process group."""
    with db.write(engine) as conn:
        fence(conn, claim)
        conn.execute(jobs.update().where(jobs.c.id == claim.job_id).values(pid=pid, pgid=pgid, host=host))
        conn.execute(runs.update().where(runs.c.id == claim.run_id).values(pid=pid, host=host))


# --------------------------------------------------------------------------- outcomes


def complete_ticketed(
    conn: Connection,
    claim: Claim,
    *,
    sink: str,
    team: str,
    category: str,
    classifier: str,
    external_id: str | None,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Record the ticket and finish the job (fenced); False if the email's ticket already existed."""
    fence(conn, claim)
    now = clock.now()
    created = insert_ignoring_conflict(
        conn,
        tickets,
        {
            "idempotency_key": ticket_key(claim.email_key),
            "email_key": claim.email_key,
            "sink": sink,
            "team": team,
            "category": category,
            "classifier": classifier,
            "external_id": external_id,
            "run_id": claim.run_id,
            "created_at": now,
        },
    )
    _finish_job(conn, claim.job_id, JOB_DONE, now)
    _set_email_state(conn, claim.email_key, EMAIL_TICKETED, now)
    _close_run(conn, claim.run_id, OUTCOME_TICKETED, now, classifier=classifier, team=team, category=category)
    common = {"job_id": claim.job_id, "attempt": claim.attempt, "run_id": claim.run_id}
    audit.append(
        conn,
        "ticket.created" if created else "ticket.exists",
        email_key=claim.email_key,
        clock=clock,
        sink=sink,
        team=team,
        category=category,
        classifier=classifier,
        **common,
    )
    audit.append(conn, "email.ticketed", email_key=claim.email_key, clock=clock, team=team, **common)
    return created


def ticket_key(email_key: str) -> str:
    """The idempotency key of an email's one ticket (DESIGN.md decision 6)."""
    return f"{email_key}:ticket"


def send_to_review(
    conn: Connection,
    claim: Claim | None,
    *,
    email_key: str,
    reason: str,
    detail: str | None = None,
    incident_id: int | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Hand the email to the human review queue; returns the (one) open review item's id.

    Fenced when `claim` is given. Without a claim (supervisor, intake) it takes the job over
    from whoever runs it, so that worker's later fence fails; a finished job raises ValueError.
    """
    if claim is not None:
        fence(conn, claim)
    now = clock.now()
    job = conn.execute(_for_update(conn, select(jobs).where(jobs.c.email_key == email_key))).first()
    if job is not None and job.state == JOB_DONE:
        raise ValueError(f"email {email_key[:12]} already reached a final state; not sent to review")
    run_id = claim.run_id if claim is not None else (job.run_id if job is not None else None)
    if job is not None:
        _finish_job(conn, job.id, JOB_REVIEW, now)
    _set_email_state(conn, email_key, EMAIL_IN_REVIEW, now)
    _close_run(conn, run_id, OUTCOME_KILLED if reason == REASON_KILLED else OUTCOME_REVIEW, now)
    existing = conn.execute(
        select(review_items.c.id)
        .where(review_items.c.email_key == email_key, review_items.c.state == REVIEW_OPEN)
        .order_by(review_items.c.id)
        .limit(1)
    ).scalar()
    if existing is not None:
        return existing
    item_id = conn.execute(
        review_items.insert()
        .values(
            email_key=email_key,
            job_id=job.id if job is not None else None,
            run_id=run_id,
            reason=reason,
            detail=detail,
            incident_id=incident_id,
            state=REVIEW_OPEN,
            created_at=now,
        )
        .returning(review_items.c.id)
    ).scalar_one()
    audit.append(
        conn,
        "review.opened",
        email_key=email_key,
        clock=clock,
        review_id=item_id,
        reason=reason,
        incident_id=incident_id,
        job_id=job.id if job is not None else None,
        run_id=run_id,
        attempt=claim.attempt if claim is not None else (job.attempts if job is not None else None),
    )
    return item_id


def fail_attempt(
    engine: Engine,
    claim: Claim,
    *,
    error: str,
    retryable: bool,
    policy: RetryPolicy,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
) -> str:
    """Record a failed attempt (fenced): "retry" (queued again after backoff) or "review"."""
    with db.write(engine) as conn:
        fence(conn, claim)
        now = clock.now()
        stored = short(error, STORED_ERROR_CHARS)
        _close_run(conn, claim.run_id, OUTCOME_ERROR, now, error=stored)
        conn.execute(jobs.update().where(jobs.c.id == claim.job_id).values(last_error=stored))
        if retryable and claim.attempt < claim.max_attempts:
            delay = policy.backoff(claim.attempt, rng)
            conn.execute(
                jobs.update()
                .where(jobs.c.id == claim.job_id)
                .values(state=JOB_QUEUED, available_at=now + delay, **_NO_LEASE, updated_at=now)
            )
            _set_email_state(conn, claim.email_key, EMAIL_QUEUED, now)
            audit.append(
                conn,
                "job.retry",
                email_key=claim.email_key,
                clock=clock,
                job_id=claim.job_id,
                attempt=claim.attempt,
                run_id=claim.run_id,
                delay_s=round(delay, 3),
                error=short(error),
            )
            return "retry"
        reason = REASON_ATTEMPTS_EXHAUSTED if retryable else REASON_PERMANENT_ERROR
        send_to_review(conn, claim, email_key=claim.email_key, reason=reason, detail=stored, clock=clock)
        return "review"


# --------------------------------------------------------------------------- kills


def request_kill(
    engine: Engine,
    job_id: int,
    *,
    reason: str,
    incident_id: int | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Ask the job's owner to kill its run; False if the job is not running. A repeat keeps the first."""
    with db.write(engine) as conn:
        now = clock.now()
        job = conn.execute(_for_update(conn, select(jobs).where(jobs.c.id == job_id))).first()
        if job is None or job.state != JOB_RUNNING:
            return False
        if job.kill_requested_at is not None:
            return True
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(kill_requested_at=now, kill_reason=reason, kill_incident_id=incident_id)
        )
        audit.append(
            conn,
            "job.kill_requested",
            email_key=job.email_key,
            clock=clock,
            job_id=job_id,
            attempt=job.attempts,
            run_id=job.run_id,
            owner=job.lease_owner,
            reason=short(reason),
            incident_id=incident_id,
        )
        return True


def kill_requests_for(engine: Engine, owner: str) -> list[KillRequest]:
    """Kill requests pending on the jobs that `owner` runs."""
    with db.read(engine) as conn:
        rows = conn.execute(
            select(jobs)
            .where(
                jobs.c.state == JOB_RUNNING,
                jobs.c.lease_owner == owner,
                jobs.c.kill_requested_at.is_not(None),
            )
            .order_by(jobs.c.id)
        ).all()
    return [
        KillRequest(
            job_id=r.id,
            email_key=r.email_key,
            attempt=r.attempts,
            run_id=r.run_id,
            reason=r.kill_reason,
            incident_id=r.kill_incident_id,
            requested_at=r.kill_requested_at,
        )
        for r in rows
    ]


def finish_killed(
    engine: Engine, claim: Claim, *, reason: str, incident_id: int | None, clock: Clock = SYSTEM_CLOCK
) -> int:
    """After the run's process group is dead: review item "killed" (fenced); returns its id."""
    with db.write(engine) as conn:
        item_id = send_to_review(
            conn,
            claim,
            email_key=claim.email_key,
            reason=REASON_KILLED,
            detail=reason,
            incident_id=incident_id,
            clock=clock,
        )
        audit.append(
            conn,
            "job.killed",
            email_key=claim.email_key,
            clock=clock,
            job_id=claim.job_id,
            attempt=claim.attempt,
            run_id=claim.run_id,
            reason=short(reason),
            incident_id=incident_id,
            review_id=item_id,
        )
        return item_id


# --------------------------------------------------------------------------- usage


def update_run_usage(
    conn: Connection,
    run_id: str,
    *,
    llm_calls: int = 0,
    tool_calls: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost_usd: float = 0.0,
    progress_at: float | None = None,
) -> None:
    """Add to a run's counters (tracing); `progress_at` moves its last-progress time forward."""
    values: dict[str, Any] = {
        "llm_calls": runs.c.llm_calls + llm_calls,
        "tool_calls": runs.c.tool_calls + tool_calls,
        "prompt_tokens": runs.c.prompt_tokens + prompt_tokens,
        "completion_tokens": runs.c.completion_tokens + completion_tokens,
        "cost_usd": runs.c.cost_usd + cost_usd,
    }
    if progress_at is not None:
        values["last_progress_at"] = progress_at
    conn.execute(runs.update().where(runs.c.id == run_id).values(**values))


# --------------------------------------------------------------------------- helpers

_NO_LEASE: dict[str, Any] = {
    "lease_owner": None,
    "lease_expires_at": None,
    "pid": None,
    "pgid": None,
    "kill_requested_at": None,
    "kill_reason": None,
    "kill_incident_id": None,
}


def _finish_job(conn: Connection, job_id: int, state: str, now: float) -> None:
    """Leave `running` for a state no lease holds (done / review)."""
    conn.execute(jobs.update().where(jobs.c.id == job_id).values(state=state, **_NO_LEASE, updated_at=now))


def _set_email_state(conn: Connection, email_key: str, state: str, now: float) -> None:
    conn.execute(emails.update().where(emails.c.key == email_key).values(state=state, updated_at=now))


def _close_run(
    conn: Connection, run_id: str | None, outcome: str, now: float, *, error: str | None = None, **extra: Any
) -> None:
    """End a run that is still open (a run already ended keeps its first outcome)."""
    if run_id is None:
        return
    started = conn.execute(
        select(runs.c.started_at).where(runs.c.id == run_id, runs.c.ended_at.is_(None))
    ).scalar()
    if started is None:
        return
    values: dict[str, Any] = {"ended_at": now, "outcome": outcome, "wall_s": max(0.0, now - started), **extra}
    if error is not None:
        values["error"] = error
    conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
