"""Where each remote intake stands: its position (IMAP UIDVALIDITY + last UID) and its health.

One row per source in `intake_cursors`. The position is advanced only after the messages
before it are in the ledger and acknowledged at the source, so a crash re-reads (and the email
key absorbs the duplicate) rather than skips. The `state` JSON holds what `crewguard status`
shows: connected, last message at, lag, last error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import intake_cursors


@dataclass(frozen=True)
class Cursor:
    """One intake's row: `source` names it (e.g. imap:crew@host:993/INBOX); `state` is its health."""

    source: str
    uidvalidity: int | None
    last_uid: int | None
    state: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0


def get_cursor(engine: Engine, source: str) -> Cursor | None:
    """The stored row for `source`, or None before its first save."""
    with db.read(engine) as conn:
        row = conn.execute(select(intake_cursors).where(intake_cursors.c.source == source)).first()
    return _to_cursor(row) if row is not None else None


def save_position(
    engine: Engine, source: str, *, uidvalidity: int | None, last_uid: int | None, clock: Clock = SYSTEM_CLOCK
) -> None:
    """Record how far `source` has been read (its state is kept)."""
    with db.write(engine) as conn:
        _upsert(conn, source, {"uidvalidity": uidvalidity, "last_uid": last_uid}, clock)


def update_state(engine: Engine, source: str, clock: Clock = SYSTEM_CLOCK, **fields: Any) -> dict[str, Any]:
    """Merge `fields` (JSON values) into the state of `source`; returns the new state."""
    with db.write(engine) as conn:
        row = conn.execute(select(intake_cursors.c.state).where(intake_cursors.c.source == source)).first()
        state = _load_state(row.state if row is not None else None)
        state.update(fields)
        _upsert(conn, source, {"state": json.dumps(state, sort_keys=True)}, clock)
    return state


def intake_states(engine: Engine) -> list[dict[str, Any]]:
    """Every remote intake's position and health, for `crewguard status` (sorted by source)."""
    with db.read(engine) as conn:
        rows = conn.execute(select(intake_cursors).order_by(intake_cursors.c.source)).all()
    return [
        {
            "source": c.source,
            "uidvalidity": c.uidvalidity,
            "last_uid": c.last_uid,
            "updated_at": c.updated_at,
            **c.state,
        }
        for c in map(_to_cursor, rows)
    ]


def is_ledger_outage(error: BaseException) -> bool:
    """True when the ledger itself is failing (retry later); False when it refused this one message.

    A message the ledger refuses (a data or integrity error) would fail the same way forever, so
    intakes set it aside (dead-letter, or leave it unacknowledged) instead of retrying it.
    """
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (sa_exc.DataError, sa_exc.IntegrityError)):
        return False
    if isinstance(error, sa_exc.StatementError) and not isinstance(error, sa_exc.DBAPIError):
        return False  # the values could not even be bound: a property of this message
    return isinstance(error, sa_exc.SQLAlchemyError)


def _upsert(conn: Connection, source: str, values: dict[str, Any], clock: Clock) -> None:
    values = {**values, "updated_at": clock.now()}
    dialect = sqlite if db.is_sqlite(conn) else postgresql
    stmt = dialect.insert(intake_cursors).values(source=source, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[intake_cursors.c.source], set_=values))


def _to_cursor(row: Any) -> Cursor:
    return Cursor(
        source=row.source,
        uidvalidity=row.uidvalidity,
        last_uid=row.last_uid,
        state=_load_state(row.state),
        updated_at=row.updated_at,
    )


def _load_state(text: str | None) -> dict[str, Any]:
    """The stored state, or {} when missing or unreadable (health data is never worth a crash)."""
    if not text:
        return {}
    try:
        state = json.loads(text)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}
