"""Liveness rows: each daemon (crew:<owner>) and the supervisor beat here; others read the age."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from sqlalchemy import Connection, select

from crewguard.crew.ledger.schema import heartbeats

#: The supervisor's component name.
SUPERVISOR = "supervisor"


def crew_component(owner: str) -> str:
    return f"crew:{owner}"


def beat(conn: Connection, component: str, at: float, info: dict[str, Any] | None = None) -> None:
    """Record that `component` is alive at `at` (update in place, insert the first time)."""
    values = {"host": socket.gethostname(), "pid": os.getpid(), "at": at, "info": json.dumps(info or {})}
    updated = conn.execute(heartbeats.update().where(heartbeats.c.component == component).values(**values)).rowcount
    if not updated:
        conn.execute(heartbeats.insert().values(component=component, **values))


def last_seen(conn: Connection, component: str) -> float | None:
    return conn.execute(select(heartbeats.c.at).where(heartbeats.c.component == component)).scalar()
