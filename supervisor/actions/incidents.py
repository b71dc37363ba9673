"""Incidents: one per problem (dedupe on `dedupe_key` while open), with their pages and audit entries.

A repeat bumps `count` / `last_seen_at` without a new page; the Slack message is updated in place
at most once per `update_interval_s`. Kills and review hand-offs are threaded replies, resolution
updates the message, and an incident open too long gets one reply mentioning the manager.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import audit, db
from crewguard.crew.ledger.schema import incidents, review_items
from crewguard.supervisor.model import Finding

OPEN = "open"
RESOLVED = "resolved"

#: incidents.action values.
ACTION_PAGED = "paged"
ACTION_KILL_REQUESTED = "kill_requested"
ACTION_KILLED = "killed"

#: Default spacing of "update" pages for an incident that keeps repeating.
DEFAULT_UPDATE_INTERVAL_S = 300.0


@dataclass(frozen=True)
class Incident:
    id: int
    dedupe_key: str
    kind: str
    severity: str
    run_id: str | None
    job_id: int | None
    email_key: str | None
    summary: str
    action: str | None
    state: str
    count: int
    opened_at: float
    last_seen_at: float
    escalated_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> Incident:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


def _enqueue_page(conn: Connection, *, text: str, incident_id: int, kind: str, clock: Clock) -> None:
    from crewguard.crew.paging import enqueue_page  # the sinks' durable Slack outbox

    enqueue_page(conn, text=text, incident_id=incident_id, kind=kind, clock=clock)


def message_text(incident: Incident | Finding, *, incident_id: int, state: str = OPEN, count: int = 1) -> str:
    """The incident's one Slack message (posted once, then updated in place)."""
    head = (
        ":white_check_mark: RESOLVED"
        if state == RESOLVED
        else f":rotating_light: {incident.severity.upper()}"
    )
    parts = [f"{head} incident #{incident_id} [{incident.kind}] {incident.summary}"]
    if incident.email_key:
        parts.append(f"email {incident.email_key[:12]}")
    if incident.job_id is not None:
        parts.append(f"job {incident.job_id}")
    if count > 1:
        parts.append(f"seen {count} times")
    return " | ".join(parts)


def load_open(conn: Connection) -> dict[str, Incident]:
    rows = conn.execute(select(incidents).where(incidents.c.state == OPEN)).all()
    return {r.dedupe_key: Incident.from_row(r) for r in rows}


def record_findings(
    engine: Engine,
    findings: Iterable[Finding],
    *,
    clock: Clock = SYSTEM_CLOCK,
    update_interval_s: float = DEFAULT_UPDATE_INTERVAL_S,
) -> list[tuple[Incident, Finding, bool]]:
    """Open or bump one incident per finding in one transaction; returns (incident, finding, is_new)."""
    findings = list(findings)
    if not findings:
        return []
    out: list[tuple[Incident, Finding, bool]] = []
    with db.write(engine) as conn:
        now = clock.now()
        open_by_key = load_open(conn)
        for finding in findings:
            existing = open_by_key.get(finding.dedupe_key)
            if existing is None:
                incident = _open(conn, finding, now, clock)
                open_by_key[finding.dedupe_key] = incident
                out.append((incident, finding, True))
            else:
                incident = _bump(conn, existing, finding, now, update_interval_s, clock)
                open_by_key[finding.dedupe_key] = incident
                out.append((incident, finding, False))
    return out


def open_incident(
    engine: Engine,
    finding: Finding,
    *,
    clock: Clock = SYSTEM_CLOCK,
    update_interval_s: float = DEFAULT_UPDATE_INTERVAL_S,
) -> tuple[int, bool]:
    """Open an incident for `finding` (or bump the open one with its dedupe key): (incident id, is_new)."""
    incident, _finding, is_new = record_findings(
        engine, [finding], clock=clock, update_interval_s=update_interval_s
    )[0]
    return incident.id, is_new


def _open(conn: Connection, finding: Finding, now: float, clock: Clock) -> Incident:
    values = {
        "dedupe_key": finding.dedupe_key,
        "kind": finding.kind,
        "severity": finding.severity,
        "run_id": finding.run_id,
        "job_id": finding.job_id,
        "email_key": finding.email_key,
        "summary": finding.summary,
        "evidence": json.dumps(finding.evidence, sort_keys=True, default=str),
        "action": ACTION_PAGED,
        "state": OPEN,
        "count": 1,
        "opened_at": now,
        "last_seen_at": now,
    }
    incident_id = conn.execute(incidents.insert().values(**values).returning(incidents.c.id)).scalar_one()
    audit.append(
        conn,
        "incident.opened",
        email_key=finding.email_key,
        clock=clock,
        incident_id=incident_id,
        kind=finding.kind,
        dedupe_key=finding.dedupe_key,
        run_id=finding.run_id,
        job_id=finding.job_id,
        action=finding.action,
        summary=finding.summary,
    )
    _enqueue_page(
        conn,
        text=message_text(finding, incident_id=incident_id),
        incident_id=incident_id,
        kind="post",
        clock=clock,
    )
    return Incident(
        id=incident_id,
        escalated_at=None,
        **{k: v for k, v in values.items() if k in Incident.__dataclass_fields__},
    )


def _bump(
    conn: Connection, incident: Incident, finding: Finding, now: float, update_interval_s: float, clock: Clock
) -> Incident:
    count = incident.count + 1
    conn.execute(
        incidents.update()
        .where(incidents.c.id == incident.id)
        .values(
            count=count, last_seen_at=now, evidence=json.dumps(finding.evidence, sort_keys=True, default=str)
        )
    )
    # Stateless pacing: update when a new `update_interval_s` period since opening has begun.
    if update_interval_s > 0 and int((now - incident.opened_at) // update_interval_s) > int(
        (incident.last_seen_at - incident.opened_at) // update_interval_s
    ):
        _enqueue_page(
            conn,
            text=message_text(incident, incident_id=incident.id, count=count),
            incident_id=incident.id,
            kind="update",
            clock=clock,
        )
    return Incident(**{**incident.__dict__, "count": count, "last_seen_at": now})


def set_action(conn: Connection, incident_id: int, action: str) -> None:
    conn.execute(incidents.update().where(incidents.c.id == incident_id).values(action=action))


def reply(conn: Connection, incident_id: int, text: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
    _enqueue_page(conn, text=text, incident_id=incident_id, kind="reply", clock=clock)


def resolve(engine: Engine, incident: Incident, *, why: str, clock: Clock = SYSTEM_CLOCK) -> None:
    """Resolve an open incident: update its message, reply with the review hand-off if a kill made one."""
    with db.write(engine) as conn:
        now = clock.now()
        done = conn.execute(
            incidents.update()
            .where(incidents.c.id == incident.id, incidents.c.state == OPEN)
            .values(state=RESOLVED, resolved_at=now)
        ).rowcount
        if not done:
            return
        audit.append(
            conn,
            "incident.resolved",
            email_key=incident.email_key,
            clock=clock,
            incident_id=incident.id,
            kind=incident.kind,
            run_id=incident.run_id,
            why=why,
        )
        current_action = conn.execute(
            select(incidents.c.action).where(incidents.c.id == incident.id)
        ).scalar()
        if current_action == ACTION_KILL_REQUESTED:
            # The owning daemon honoured the kill: say where the email went.
            review_id = conn.execute(
                select(review_items.c.id).where(review_items.c.incident_id == incident.id).limit(1)
            ).scalar()
            if review_id is not None:
                set_action(conn, incident.id, ACTION_KILLED)
                reply(
                    conn,
                    incident.id,
                    f"run {incident.run_id} was killed; the email is in review (item #{review_id})",
                    clock=clock,
                )
        _enqueue_page(
            conn,
            text=message_text(incident, incident_id=incident.id, state=RESOLVED, count=incident.count)
            + f" | {why}",
            incident_id=incident.id,
            kind="update",
            clock=clock,
        )


def escalate(engine: Engine, incident: Incident, *, manager: str, clock: Clock = SYSTEM_CLOCK) -> bool:
    """One reply mentioning the manager for an incident open too long; False if already escalated."""
    with db.write(engine) as conn:
        now = clock.now()
        done = conn.execute(
            incidents.update()
            .where(
                incidents.c.id == incident.id, incidents.c.state == OPEN, incidents.c.escalated_at.is_(None)
            )
            .values(escalated_at=now)
        ).rowcount
        if not done:
            return False
        minutes = (now - incident.opened_at) / 60
        from crewguard.crew.paging import manager_mention

        reply(
            conn,
            incident.id,
            f"{manager_mention(manager)} incident #{incident.id} [{incident.kind}] is still open after {minutes:.0f} min",
            clock=clock,
        )
        audit.append(
            conn,
            "incident.escalated",
            email_key=incident.email_key,
            clock=clock,
            incident_id=incident.id,
            kind=incident.kind,
            manager=manager,
        )
        return True
