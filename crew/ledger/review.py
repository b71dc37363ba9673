"""The human review queue: list and show items, route an email by hand, or run it again.

Review items never expire. Each human action is one transaction with its audit entry.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Row, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import audit, db
from crewguard.crew.ledger.jobs import (
    REVIEW_OPEN,
    REVIEW_REQUEUED,
    REVIEW_RESOLVED,
    insert_ignoring_conflict,
    ticket_key,
)
from crewguard.crew.ledger.schema import (
    EMAIL_QUEUED,
    EMAIL_RESOLVED,
    JOB_DONE,
    JOB_QUEUED,
    emails,
    jobs,
    review_items,
    runs,
    tickets,
)

#: Sink recorded for tickets a human routes (the local helpdesk).
HUMAN_SINK = "helpdesk"
#: Classifier recorded for tickets a human routes.
HUMAN_CLASSIFIER = "human"
#: Category recorded when the human gives none (the column is required).
DEFAULT_HUMAN_CATEGORY = "uncategorized"

_ITEM_COLUMNS = (
    *review_items.c,
    emails.c.subject,
    emails.c.sender,
    emails.c.message_id,
    emails.c.state.label("email_state"),
)


def list_review(engine: Engine, state: str | None = REVIEW_OPEN) -> list[dict[str, Any]]:
    """Review items in `state` (None: all), oldest first, with the email's subject and sender."""
    stmt = select(*_ITEM_COLUMNS).outerjoin(emails, emails.c.key == review_items.c.email_key)
    if state is not None:
        stmt = stmt.where(review_items.c.state == state)
    with db.read(engine) as conn:
        return [dict(r._mapping) for r in conn.execute(stmt.order_by(review_items.c.id))]


def get_review(engine: Engine, item_id: int) -> dict[str, Any] | None:
    """One review item with its email's headers, parse error and every run of the email."""
    with db.read(engine) as conn:
        row = conn.execute(
            select(*_ITEM_COLUMNS, emails.c.parse_error, emails.c.size, emails.c.received_at)
            .outerjoin(emails, emails.c.key == review_items.c.email_key)
            .where(review_items.c.id == item_id)
        ).first()
        if row is None:
            return None
        item = dict(row._mapping)
        item["runs"] = [
            dict(r._mapping)
            for r in conn.execute(
                select(
                    runs.c.id,
                    runs.c.attempt,
                    runs.c.worker,
                    runs.c.started_at,
                    runs.c.ended_at,
                    runs.c.outcome,
                    runs.c.classifier,
                    runs.c.llm_calls,
                    runs.c.prompt_tokens,
                    runs.c.completion_tokens,
                    runs.c.error,
                )
                .where(runs.c.email_key == item["email_key"])
                .order_by(runs.c.started_at, runs.c.attempt)
            )
        ]
        return item


def resolve_review(
    engine: Engine,
    item_id: int,
    *,
    team: str,
    category: str | None = None,
    by: str = "human",
    clock: Clock = SYSTEM_CLOCK,
) -> dict[str, Any]:
    """A human routes the email to `team`: helpdesk ticket (kept if one exists), email resolved.

    `by` names who acted (for the audit log). Validating `team` is the caller's job.
    Raises ValueError for an unknown item or one that is no longer open.
    """
    with db.write(engine) as conn:
        item = _open_item(conn, item_id)
        now = clock.now()
        category = category or DEFAULT_HUMAN_CATEGORY
        created = insert_ignoring_conflict(
            conn,
            tickets,
            {
                "idempotency_key": ticket_key(item.email_key),
                "email_key": item.email_key,
                "sink": HUMAN_SINK,
                "team": team,
                "category": category,
                "classifier": HUMAN_CLASSIFIER,
                "external_id": None,
                "run_id": None,
                "created_at": now,
            },
        )
        conn.execute(
            jobs.update().where(jobs.c.email_key == item.email_key).values(state=JOB_DONE, updated_at=now)
        )
        conn.execute(
            emails.update().where(emails.c.key == item.email_key).values(state=EMAIL_RESOLVED, updated_at=now)
        )
        conn.execute(
            review_items.update()
            .where(review_items.c.id == item_id)
            .values(state=REVIEW_RESOLVED, closed_at=now, resolution=team)
        )
        if created:
            audit.append(
                conn,
                "ticket.created",
                email_key=item.email_key,
                clock=clock,
                sink=HUMAN_SINK,
                team=team,
                category=category,
                classifier=HUMAN_CLASSIFIER,
                review_id=item_id,
            )
        audit.append(
            conn,
            "review.resolved",
            email_key=item.email_key,
            clock=clock,
            review_id=item_id,
            team=team,
            category=category,
            by=by,
            ticket_created=created,
        )
        ticket = conn.execute(
            select(tickets).where(tickets.c.idempotency_key == ticket_key(item.email_key))
        ).one()
        return {**_item(conn, item_id), "ticket": dict(ticket._mapping), "ticket_created": created}


def requeue_review(engine: Engine, item_id: int, *, clock: Clock = SYSTEM_CLOCK) -> dict[str, Any]:
    """Run the email again from scratch (attempts reset to 0). Raises ValueError unless the item is open."""
    with db.write(engine) as conn:
        item = _open_item(conn, item_id)
        now = clock.now()
        conn.execute(
            jobs.update()
            .where(jobs.c.email_key == item.email_key)
            .values(
                state=JOB_QUEUED,
                attempts=0,
                available_at=now,
                lease_owner=None,
                lease_expires_at=None,
                pid=None,
                pgid=None,
                kill_requested_at=None,
                kill_reason=None,
                kill_incident_id=None,
                updated_at=now,
            )
        )
        conn.execute(
            emails.update().where(emails.c.key == item.email_key).values(state=EMAIL_QUEUED, updated_at=now)
        )
        conn.execute(
            review_items.update()
            .where(review_items.c.id == item_id)
            .values(state=REVIEW_REQUEUED, closed_at=now, resolution="requeued")
        )
        audit.append(conn, "review.requeued", email_key=item.email_key, clock=clock, review_id=item_id)
        return _item(conn, item_id)


def _open_item(conn: Connection, item_id: int) -> Row[Any]:
    item = conn.execute(select(review_items).where(review_items.c.id == item_id)).first()
    if item is None:
        raise ValueError(f"review item {item_id} does not exist")
    if item.state != REVIEW_OPEN:
        raise ValueError(f"review item {item_id} is already {item.state}; only open items can be acted on")
    return item


def _item(conn: Connection, item_id: int) -> dict[str, Any]:
    row = conn.execute(
        select(*_ITEM_COLUMNS)
        .outerjoin(emails, emails.c.key == review_items.c.email_key)
        .where(review_items.c.id == item_id)
    ).one()
    return dict(row._mapping)
