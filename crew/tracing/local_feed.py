"""The local real-time feed: span starts and ends written into the ledger's `trace_events` table.

Langfuse sees a span only when it ends; the supervisor needs in-flight LLM and tool calls at once,
so this second span processor records starts too. It never slows or fails the crew: `on_start` /
`on_end` only put a row into a bounded in-memory queue, and a background thread writes queued
rows (and the runs' usage counters) in short transactions. When the ledger is locked or down,
rows wait in a bounded retry buffer and are dropped (and counted) beyond it; nothing raises.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode
from sqlalchemy import Connection, Engine

from crewguard.crew.ledger.schema import trace_events
from crewguard.crew.tracing import spans
from crewguard.crew.tracing.accounting import PriceTable, RunUsage, UsageBook, write_usage, write_wall_time
from crewguard.crew.tracing.masking import mask_text

log = logging.getLogger(__name__)

#: Rows held in memory while the ledger is slow; beyond this, new rows are dropped and counted.
FEED_QUEUE_MAX = 10_000
#: Rows of a failed batch kept for the next attempt; older ones are dropped and counted.
RETRY_BUFFER_MAX = 5_000
#: Rows per insert statement.
MAX_BATCH_ROWS = 500
#: How long the writer waits for rows before looking again (and its batching period under load).
BATCH_INTERVAL_S = 0.02
#: Pause after a failed write, so a dead ledger is not hammered.
RETRY_PAUSE_S = 0.25
#: How long one feed write waits for a lock (SQLite busy timeout / PostgreSQL lock_timeout).
LOCK_TIMEOUT_MS = 250
#: Longest statement on PostgreSQL before the feed gives up on it.
STATEMENT_TIMEOUT_MS = 2_000
#: Seconds between two warnings about a failing ledger (the count is in the next warning).
WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class RunInfo:
    """The run whose spans are being recorded (one at a time per child process)."""

    run_id: str
    email_key: str | None = None
    job_id: int | None = None


class CurrentRun:
    """The run being traced in this process (a child runs one at a time)."""

    def __init__(self) -> None:
        self.info: RunInfo | None = None

    def get(self) -> RunInfo | None:
        return self.info


class FeedWriter:
    """Background writer of feed rows and usage counters into the ledger.

    engine: the ledger. store_events: write `trace_events` rows (False: usage counters only).
    usage: where the processor accumulates per-run counters.
    """

    def __init__(
        self,
        engine: Engine,
        usage: UsageBook,
        *,
        store_events: bool = True,
        queue_max: int = FEED_QUEUE_MAX,
        interval_s: float = BATCH_INTERVAL_S,
    ) -> None:
        self._engine = engine
        self._usage = usage
        self._store_events = store_events
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_max)
        self._interval_s = interval_s
        self._retry: list[dict[str, Any]] = []
        self._walls: dict[str, float] = {}
        self._walls_lock = threading.Lock()
        self._busy = False
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._last_warning = 0.0
        self.dropped = 0  # rows lost: queue full, or retry buffer overflow
        self.written = 0  # rows committed
        self.failed_writes = 0  # transactions that failed (locked, down, ...)
        self._thread = threading.Thread(target=self._run, name="crewguard-trace-feed", daemon=True)
        self._thread.start()

    # --- producer side (span hot path) -------------------------------------------------
    def submit(self, row: dict[str, Any]) -> None:
        if not self._store_events:
            return
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def set_wall_time(self, run_id: str, wall_s: float) -> None:
        with self._walls_lock:
            self._walls[run_id] = wall_s

    def idle(self) -> bool:
        """True when everything submitted so far is written (or dropped)."""
        with self._walls_lock:
            walls = bool(self._walls)
        return not (
            self._busy or self._retry or walls or not self._queue.empty() or self._usage.has_pending()
        )

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the queue to be written; False when time ran out."""
        deadline = time.monotonic() + timeout_s
        while not self.idle():
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout_s: float) -> bool:
        """Flush within `timeout_s`, then stop the thread (abandoned if stuck: it is a daemon)."""
        start = time.monotonic()
        flushed = self.flush(timeout_s)
        self._stop.set()
        self._thread.join(max(0.0, timeout_s - (time.monotonic() - start)))
        if not flushed:
            self.dropped += self._queue.qsize() + len(self._retry)
        return flushed

    # --- writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=self._interval_s)
            except queue.Empty:
                first = None
            self._busy = True
            ok = True
            try:
                batch = self._retry
                self._retry = []
                if first is not None:
                    batch.append(first)
                while len(batch) < RETRY_BUFFER_MAX:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                usage = self._usage.take_pending()
                with self._walls_lock:
                    walls, self._walls = self._walls, {}
                if batch or usage or walls:
                    ok = self._write(batch, usage, walls)
                    if not ok:
                        self._usage.give_back(usage)
                        with self._walls_lock:
                            self._walls = {**walls, **self._walls}
                        overflow = max(0, len(batch) - RETRY_BUFFER_MAX)
                        self.dropped += overflow
                        self._retry = batch[overflow:]
            except Exception:  # a bug here must not end the feed
                ok = False
                log.exception("trace feed: writer error")
            finally:
                self._busy = False
            if not ok:
                self._stop.wait(RETRY_PAUSE_S)

    def _write(self, rows: list[dict[str, Any]], usage: dict[str, RunUsage], walls: dict[str, float]) -> bool:
        try:
            conn = self._connection()
            with conn.begin():
                for i in range(0, len(rows), MAX_BATCH_ROWS):
                    conn.execute(trace_events.insert(), rows[i : i + MAX_BATCH_ROWS])
                for run_id, part in usage.items():
                    write_usage(conn, run_id, part)
                for run_id, wall_s in walls.items():
                    write_wall_time(conn, run_id, wall_s)
        except Exception as exc:  # locked, down, schema missing ...: the crew must not notice
            self.failed_writes += 1
            self._drop_connection()
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY_S:
                self._last_warning = now
                log.warning(
                    "trace feed: ledger write failed (%s); %d write(s) failed, %d row(s) dropped so far",
                    type(exc).__name__,
                    self.failed_writes,
                    self.dropped,
                )
            return False
        self.written += len(rows)
        return True

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._engine.connect()
            try:
                if conn.dialect.name == "sqlite":
                    # The ledger waits 30 s for a busy database; the feed would rather retry later.
                    conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_MS}")
                else:
                    conn.exec_driver_sql(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                    conn.exec_driver_sql(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
                    conn.commit()
            except Exception:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                pass
            self._conn = None


class LocalFeedProcessor(SpanProcessor):
    """Records span starts/ends of the current run into the feed and its usage into the book.

    usage/prices: per-run accounting. writer: where rows go (None: accounting only, nothing stored).
    mask_mode: settings.tracing.mask, applied to every stored attribute and name.
    current_run: returns the run being traced, or None (spans outside a run are not recorded).
    """

    def __init__(
        self,
        *,
        usage: UsageBook,
        prices: PriceTable,
        writer: FeedWriter | None,
        mask_mode: str,
        current_run: Callable[[], RunInfo | None],
    ) -> None:
        self._usage = usage
        self._prices = prices
        self._writer = writer
        self._mask = mask_mode
        self._current_run = current_run
        self._span_runs: dict[int, str] = {}  # span id -> run id, taken at start
        self.errors = 0  # spans this processor failed to record (never raised)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            self._record(span, "start")
        except Exception:
            self.errors += 1
            log.debug("trace feed: could not record span start", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._record(span, "end")
        except Exception:
            self.errors += 1
            log.debug("trace feed: could not record span end", exc_info=True)

    def _record(self, span: ReadableSpan, phase: str) -> None:
        attributes = span.attributes or {}
        kind = spans.span_kind(attributes)
        context = span.get_span_context()
        if kind is None or context is None:
            return
        if phase == "start":
            run = self._current_run()
            if run is None:
                return
            run_id = run.run_id
            self._span_runs[context.span_id] = run_id
            at = (span.start_time or time.time_ns()) / 1e9
            attrs = spans.start_attributes(kind, attributes, self._mask)
            usage = RunUsage(
                llm_calls=int(kind == spans.KIND_LLM), tool_calls=int(kind == spans.KIND_TOOL), progress_at=at
            )
        else:
            run_id = self._span_runs.pop(context.span_id, None)
            if run_id is None:
                return
            at = (span.end_time or time.time_ns()) / 1e9
            error = None
            if span.status.status_code == StatusCode.ERROR:
                error = span.status.description or "error"
            attrs = spans.end_attributes(kind, attributes, self._mask, error=error)
            usage = RunUsage(progress_at=at)
            if kind == spans.KIND_LLM:
                usage.prompt_tokens = attrs["prompt_tokens"]
                usage.completion_tokens = attrs["completion_tokens"]
                usage.cost_usd = self._prices.cost(
                    attrs.get("model"), usage.prompt_tokens, usage.completion_tokens
                )
        self._usage.add(run_id, usage)
        if self._writer is None:
            return
        parent = span.parent
        self._writer.submit(
            {
                "run_id": run_id,
                "trace_id": format(context.trace_id, "032x"),
                "span_id": format(context.span_id, "016x"),
                "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
                "phase": phase,
                "kind": kind,
                "name": mask_text(span.name, self._mask),
                "at": at,
                "attributes": json.dumps(attrs, sort_keys=True, default=str),
            }
        )

    def shutdown(self) -> None:
        self._span_runs.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True if self._writer is None else self._writer.flush(timeout_millis / 1000)
