"""Read-only views of the ledger for `crewguard status` and `crewguard tickets list`."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, func, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.jobs import REVIEW_OPEN
from crewguard.crew.ledger.schema import (
    EMAIL_STATES,
    JOB_QUEUED,
    JOB_RUNNING,
    emails,
    heartbeats,
    incidents,
    jobs,
    review_items,
    runs,
    tickets,
)

#: The heartbeats row the supervisor writes.
SUPERVISOR_COMPONENT = "supervisor"
#: Incident state counted as open.
INCIDENT_OPEN = "open"


def status_snapshot(engine: Engine, clock: Clock = SYSTEM_CLOCK) -> dict[str, Any]:
    """Emails by state, queue depth and age, running jobs, review queue, incidents, supervisor, usage."""
    now = clock.now()
    with db.read(engine) as conn:
        by_state = dict(conn.execute(select(emails.c.state, func.count()).group_by(emails.c.state)).all())
        email_counts = {state: int(by_state.get(state, 0)) for state in EMAIL_STATES}
        email_counts = {"total": sum(int(n) for n in by_state.values()), **email_counts}

        depth, ready, oldest_ready = conn.execute(
            select(
                func.count(),
                func.count().filter(jobs.c.available_at <= now),
                func.min(jobs.c.available_at).filter(jobs.c.available_at <= now),
            ).where(jobs.c.state == JOB_QUEUED)
        ).one()

        running = [
            dict(r._mapping)
            for r in conn.execute(
                select(
                    jobs.c.id.label("job_id"),
                    jobs.c.email_key,
                    jobs.c.attempts.label("attempt"),
                    jobs.c.lease_owner.label("owner"),
                    jobs.c.host,
                    jobs.c.pid,
                    jobs.c.pgid,
                    jobs.c.run_id,
                    jobs.c.lease_expires_at,
                    jobs.c.kill_requested_at,
                    runs.c.started_at,
                    runs.c.last_progress_at,
                    runs.c.llm_calls,
                    runs.c.tool_calls,
                    runs.c.prompt_tokens,
                    runs.c.completion_tokens,
                    runs.c.cost_usd,
                )
                .outerjoin(runs, runs.c.id == jobs.c.run_id)
                .where(jobs.c.state == JOB_RUNNING)
                .order_by(jobs.c.id)
            )
        ]

        review_open, review_oldest = conn.execute(
            select(func.count(), func.min(review_items.c.created_at)).where(
                review_items.c.state == REVIEW_OPEN
            )
        ).one()
        incidents_open = conn.execute(
            select(func.count()).select_from(incidents).where(incidents.c.state == INCIDENT_OPEN)
        ).scalar_one()
        beat = conn.execute(
            select(heartbeats.c.at).where(heartbeats.c.component == SUPERVISOR_COMPONENT)
        ).scalar()
        run_total, llm_calls, tokens, cost = conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(runs.c.llm_calls), 0),
                func.coalesce(func.sum(runs.c.prompt_tokens + runs.c.completion_tokens), 0),
                func.coalesce(func.sum(runs.c.cost_usd), 0.0),
            )
        ).one()

    return {
        "emails": email_counts,
        "queue": {
            "depth": int(depth),
            "ready": int(ready),
            "oldest_age_s": _age(now, oldest_ready),
        },
        "running": running,
        "review": {"open": int(review_open), "oldest_age_s": _age(now, review_oldest)},
        "incidents_open": int(incidents_open),
        "supervisor": None if beat is None else {"last_heartbeat_at": beat, "age_s": _age(now, beat)},
        "runs": {
            "total": int(run_total),
            "llm_calls": int(llm_calls),
            "tokens": int(tokens),
            "cost_usd": float(cost),
        },
    }


def _age(now: float, since: float | None) -> float:
    """Seconds since `since` (0.0 when there is nothing to age)."""
    return 0.0 if since is None else max(0.0, now - float(since))


def list_tickets(engine: Engine) -> list[dict[str, Any]]:
    """Every ticket, oldest first."""
    with db.read(engine) as conn:
        return [dict(r._mapping) for r in conn.execute(select(tickets).order_by(tickets.c.id))]


def list_incidents(engine: Engine, state: str | None = None) -> list[dict[str, Any]]:
    """Incidents, newest first, with the evidence decoded (for `crewguard incidents list`)."""
    from crewguard.crew.ledger.schema import incidents

    stmt = select(incidents).order_by(incidents.c.id.desc())
    if state is not None:
        stmt = stmt.where(incidents.c.state == state)
    with db.read(engine) as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    for row in rows:
        try:
            row["evidence"] = json.loads(row["evidence"]) if row["evidence"] else None
        except ValueError:
            pass  # keep the stored text as it is
    return rows
