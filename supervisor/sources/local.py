"""The local real-time feed: span starts and ends written into `trace_events` by each worker child.

Read incrementally by id and paired start/end per span, so a call in flight is visible the moment
it starts (Langfuse only learns about a span when it ends).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import runs, trace_events
from crewguard.supervisor.model import TOOL, ActiveRun, Observation, insort_observation
from crewguard.supervisor.sources.base import SourceUnavailable, content_key, shape_key

#: Rows read per query while catching up.
FEED_BATCH_ROWS = 20_000
#: PostgreSQL ids can commit out of order: re-read this many ids below the high-water mark.
PG_REREAD_IDS = 1_000
#: State of a run that is no longer active is dropped after this long without events.
FORGET_AFTER_S = 120.0

_COLUMNS = (
    trace_events.c.id,
    trace_events.c.run_id,
    trace_events.c.span_id,
    trace_events.c.phase,
    trace_events.c.kind,
    trace_events.c.name,
    trace_events.c.at,
    trace_events.c.attributes,
)


class LocalFeedSource:
    """Incremental reader of `trace_events`; keeps per-run, per-span state between scans."""

    def __init__(self, engine: Engine, *, clock: Clock = SYSTEM_CLOCK, batch_rows: int = FEED_BATCH_ROWS):
        """`batch_rows`: rows per query; `clock`: decides when ended runs' state is forgotten."""
        self.engine = engine
        self.clock = clock
        self.batch_rows = batch_rows
        self.reread_ids = 0 if db.is_sqlite(engine) else PG_REREAD_IDS
        self._spans: dict[str, dict[str, Observation]] = {}
        self._ordered: dict[str, list[Observation]] = {}
        self._touched: dict[str, float] = {}
        self._high_id: int | None = None  # None until the first read
        self._recent_ids: set[int] = set()
        self._seq = 0
        self.rows_read = 0

    def observations_for(self, active_runs: Mapping[str, ActiveRun]) -> dict[str, list[Observation]]:
        try:
            if self._high_id is None:
                self._first_read()
            else:
                self._read_new()
        except SQLAlchemyError as exc:
            raise SourceUnavailable(f"ledger trace feed unreadable: {type(exc).__name__}") from None
        self._forget(active_runs)
        return {rid: self._ordered[rid] for rid in active_runs if rid in self._ordered}

    def all_observations(self) -> dict[str, list[Observation]]:
        """Every run still held, including runs that ended since the last scans (fleet statistics)."""
        return self._ordered

    # --- reading -------------------------------------------------------------------
    def _first_read(self) -> None:
        """Catch up on the active runs only, not on the whole history of the table."""
        with db.read(self.engine) as conn:
            high = conn.execute(select(func.max(trace_events.c.id))).scalar() or 0
            rows = conn.execute(
                select(*_COLUMNS)
                .join(runs, runs.c.id == trace_events.c.run_id)
                .where(runs.c.ended_at.is_(None), trace_events.c.id <= high)
                .order_by(trace_events.c.id)
            ).all()
        for row in rows:
            self._apply(row)
        self._high_id = high
        self._recent_ids = {row.id for row in rows if row.id > high - self.reread_ids}

    def _read_new(self) -> None:
        assert self._high_id is not None
        low = self._high_id - self.reread_ids
        while True:
            with db.read(self.engine) as conn:
                rows = conn.execute(
                    select(*_COLUMNS)
                    .where(trace_events.c.id > low)
                    .order_by(trace_events.c.id)
                    .limit(self.batch_rows)
                ).all()
            for row in rows:
                if row.id in self._recent_ids:
                    continue
                self._apply(row)
                if self.reread_ids:
                    self._recent_ids.add(row.id)
            if rows:
                self._high_id = max(self._high_id, rows[-1].id)
                low = rows[-1].id
            if len(rows) < self.batch_rows:
                break
        if self.reread_ids:
            floor = self._high_id - self.reread_ids
            self._recent_ids = {i for i in self._recent_ids if i > floor}

    def _apply(self, row: Any) -> None:
        self.rows_read += 1
        attrs = _attributes(row.attributes)
        spans = self._spans.setdefault(row.run_id, {})
        ob = spans.get(row.span_id)
        if ob is None:
            self._seq += 1
            ob = Observation(
                run_id=row.run_id,
                span_id=row.span_id,
                kind=row.kind,
                name=row.name,
                started_at=row.at,
                seq=self._seq,
            )
            spans[row.span_id] = ob
            insort_observation(self._ordered.setdefault(row.run_id, []), ob)
        elif row.phase == "start" and row.at != ob.started_at:
            # The end arrived first (out-of-order commit): move the span to its real start.
            ordered = self._ordered[row.run_id]
            ordered.remove(ob)
            ob.started_at = row.at
            insort_observation(ordered, ob)
        if row.phase == "end":
            ob.ended_at = row.at
            ob.prompt_tokens = _int(attrs.get("prompt_tokens")) or ob.prompt_tokens
            ob.completion_tokens = _int(attrs.get("completion_tokens")) or ob.completion_tokens
            if not ob.prompt_tokens and not ob.completion_tokens:
                ob.prompt_tokens = _int(attrs.get("total_tokens"))
            err = attrs.get("error")
            ob.error = str(err) if err else None
        if ob.kind == TOOL and ob.tool is None:
            ob.tool = str(attrs.get("tool") or row.name)
        if ob.args_key is None and "args" in attrs:
            ob.args_key = content_key(attrs["args"])
            ob.args_shape = shape_key(attrs["args"])
        ob.prompt_sha = ob.prompt_sha or attrs.get("prompt_sha")
        ob.model = ob.model or attrs.get("model")
        self._touched[row.run_id] = self.clock.now()

    def _forget(self, active_runs: Mapping[str, ActiveRun]) -> None:
        cutoff = self.clock.now() - FORGET_AFTER_S
        for rid in [r for r, t in self._touched.items() if t < cutoff and r not in active_runs]:
            self._touched.pop(rid, None)
            self._spans.pop(rid, None)
            self._ordered.pop(rid, None)


def _attributes(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
