"""Tracing for one job's child process: OpenTelemetry with CrewAI spans, our flow steps, Langfuse
export and the local real-time feed.

One `TracerProvider` per child (started after the fork) carries:
- OpenInference's CrewAI instrumentation in event-listener mode (crew/agent/LLM/tool spans with
  model, token counts and tool arguments);
- our tracer `crewguard` for the run's root span, flow steps and point-in-time events;
- the local feed processor (span starts and ends into `trace_events`, per-run usage into `runs`);
- when configured, Langfuse SDK 5's batch exporter, attached to this provider
  (`Langfuse(tracer_provider=tp)` adds its processor to it instead of creating a global one).

Langfuse's default export filter keeps only spans of known LLM scopes; our flow spans come from
scope `crewguard`, so the filter is widened to that scope (`_export_span`) and they carry
`langfuse.observation.type` / metadata attributes like the SDK's own spans. Using our own tracer
rather than the Langfuse client's keeps flow steps in the local feed when Langfuse is off.

Nothing here may hurt the crew: a failing setup degrades to a no-op handle, span hooks never
raise, and `shutdown` returns within its timeout even when Langfuse is down or blackholed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine

from crewguard.crew.tracing import spans
from crewguard.crew.tracing.accounting import PriceTable, RunUsage, UsageBook
from crewguard.crew.tracing.local_feed import CurrentRun, FeedWriter, LocalFeedProcessor, RunInfo
from crewguard.crew.tracing.masking import langfuse_span_masker
from crewguard.settings import Settings

log = logging.getLogger(__name__)

#: Langfuse span/trace name of one email's run (also the root span's name).
RUN_SPAN_NAME = "crewguard.email"
#: How long the end of a run waits for CrewAI's event handlers (they open/close its spans).
EVENT_BUS_FLUSH_S = 1.0
#: How long the end of a run waits for the local feed to reach the ledger.
FEED_FLUSH_ON_RUN_END_S = 1.0
#: Default bound of `shutdown`: a worker's exit is never delayed longer than this.
SHUTDOWN_TIMEOUT_S = 2.0
#: Environment variables holding Langfuse credentials and endpoint (never in config files).
LANGFUSE_PUBLIC_KEY_ENV = "LANGFUSE_PUBLIC_KEY"
LANGFUSE_SECRET_KEY_ENV = "LANGFUSE_SECRET_KEY"
LANGFUSE_BASE_URL_ENV = "LANGFUSE_BASE_URL"


def _export_span(span: Any) -> bool:
    """Langfuse's default export filter, plus our own flow-step scope."""
    from langfuse.span_filter import is_default_export_span

    scope = span.instrumentation_scope
    return (scope is not None and scope.name == spans.FLOW_SCOPE) or is_default_export_span(span)


class StepSpan:
    """One flow step in progress; `set(...)` adds fields (e.g. classifier=...) seen on its end row."""

    def __init__(self, span: Any | None) -> None:
        self._span = span

    def set(self, **fields: Any) -> None:
        if self._span is None:
            return
        try:
            for key, value in fields.items():
                if value is not None:
                    self._span.set_attribute(spans.ATTR_METADATA_PREFIX + key, _json(value))
        except Exception:
            log.debug("tracing: could not set step fields", exc_info=True)

    def fail(self, error: str | BaseException) -> None:
        """Mark the step failed without raising (e.g. a handled error before a retry)."""
        if self._span is None:
            return
        try:
            from opentelemetry.trace import Status, StatusCode

            text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            text = text[: spans.ERROR_TEXT_CHARS]
            self._span.set_attribute(spans.ATTR_METADATA_PREFIX + "error", _json(text))
            self._span.set_attribute(spans.ATTR_LEVEL, "ERROR")
            self._span.set_attribute(spans.ATTR_STATUS_MESSAGE, text)
            self._span.set_status(Status(StatusCode.ERROR, text))
        except Exception:
            log.debug("tracing: could not mark step failed", exc_info=True)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


class TracingHandle:
    """Tracing of one child process. Every method is safe to call and never raises for tracing
    reasons; a handle built without components (`TracingHandle()`) is a no-op."""

    def __init__(
        self,
        *,
        provider: Any | None = None,
        tracer: Any | None = None,
        feed: LocalFeedProcessor | None = None,
        writer: FeedWriter | None = None,
        usage: UsageBook | None = None,
        langfuse: Any | None = None,
        instrumentor: Any | None = None,
        current: CurrentRun | None = None,
    ) -> None:
        self._provider = provider
        self._tracer = tracer
        self._feed = feed
        self._writer = writer
        self._usage = usage or UsageBook()
        self._langfuse = langfuse
        self._instrumentor = instrumentor
        self._current = current or CurrentRun()
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @property
    def langfuse(self) -> Any | None:
        """The Langfuse client (None when Langfuse export is off)."""
        return self._langfuse

    def current_run(self) -> RunInfo | None:
        return self._current.get()

    def usage(self, run_id: str) -> RunUsage:
        """What the run has used so far (as counted in this process)."""
        return self._usage.totals(run_id)

    def stats(self) -> dict[str, int]:
        """Feed health counters: rows written/dropped, failed writes, processor errors."""
        writer, feed = self._writer, self._feed
        return {
            "written": writer.written if writer else 0,
            "dropped": writer.dropped if writer else 0,
            "failed_writes": writer.failed_writes if writer else 0,
            "errors": feed.errors if feed else 0,
        }

    # --- the run --------------------------------------------------------------------
    @contextlib.contextmanager
    def run_scope(
        self, *, run_id: str, email_key: str | None = None, job_id: int | None = None
    ) -> Iterator[None]:
        """Everything inside is one Langfuse session/trace (session id = run id) and is recorded in
        the local feed under `run_id`. Exceptions from the body propagate unchanged."""
        if self._tracer is None:
            yield
            return
        stack = contextlib.ExitStack()
        root = None
        started = time.monotonic()
        try:
            self._current.info = RunInfo(run_id=run_id, email_key=email_key, job_id=job_id)
            if self._langfuse is not None:
                from langfuse import propagate_attributes

                metadata = {"run_id": run_id}
                if email_key:
                    metadata["email_key"] = email_key
                if job_id is not None:
                    metadata["job_id"] = str(job_id)
                stack.enter_context(
                    propagate_attributes(session_id=run_id, metadata=metadata, trace_name=RUN_SPAN_NAME)
                )
            attrs = spans.flow_attributes("run", {"email_key": email_key, "job_id": job_id})
            attrs[spans.ATTR_OBSERVATION_TYPE] = "agent"
            root = stack.enter_context(
                self._tracer.start_as_current_span(
                    RUN_SPAN_NAME, attributes=attrs, record_exception=False, set_status_on_exception=False
                )
            )
        except Exception:
            log.warning("tracing: could not open the run scope; the run continues untraced", exc_info=True)
        try:
            yield
        except BaseException as exc:
            StepSpan(root).fail(exc)
            raise
        finally:
            self._end_run(stack, run_id, time.monotonic() - started)

    def _end_run(self, stack: contextlib.ExitStack, run_id: str, wall_s: float) -> None:
        try:
            bus_module = sys.modules.get("crewai.events.event_bus")
            if bus_module is not None:  # CrewAI's handlers open/close its spans on a thread pool
                bus_module.crewai_event_bus.flush(timeout=EVENT_BUS_FLUSH_S)
        except Exception:
            log.debug("tracing: event bus flush failed", exc_info=True)
        try:
            stack.close()
        except Exception:
            log.debug("tracing: closing the run scope failed", exc_info=True)
        self._current.info = None
        if self._writer is not None:
            self._writer.set_wall_time(run_id, wall_s)
            self._writer.flush(FEED_FLUSH_ON_RUN_END_S)

    # --- flow steps -----------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[StepSpan]:
        """A flow step (e.g. "classify.llm", attempt=1): a FLOW span; an exception marks it failed
        and propagates."""
        span_cm = None
        span = None
        if self._tracer is not None:
            try:
                attrs = spans.flow_attributes(name, fields)
                attrs[spans.ATTR_OBSERVATION_TYPE] = "span"
                span_cm = self._tracer.start_as_current_span(
                    name, attributes=attrs, record_exception=False, set_status_on_exception=False
                )
                span = span_cm.__enter__()
            except Exception:
                log.debug("tracing: could not start step %s", name, exc_info=True)
                span_cm = span = None
        step = StepSpan(span)
        try:
            yield step
        except BaseException as exc:
            step.fail(exc)
            raise
        finally:
            if span_cm is not None:
                try:
                    span_cm.__exit__(None, None, None)
                except Exception:
                    log.debug("tracing: could not end step %s", name, exc_info=True)

    def event(self, name: str, **fields: Any) -> None:
        """A point-in-time flow event (e.g. "retry", attempt=2, delay_s=1.3, error="...")."""
        if self._tracer is None:
            return
        try:
            attrs = spans.flow_attributes(name, fields)
            attrs[spans.ATTR_OBSERVATION_TYPE] = "event"
            if fields.get("error"):
                attrs[spans.ATTR_LEVEL] = "WARNING"
            self._tracer.start_span(name, attributes=attrs).end()
        except Exception:
            log.debug("tracing: could not record event %s", name, exc_info=True)

    # --- the end --------------------------------------------------------------------
    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Flush the feed and Langfuse and stop, within `timeout_s` whatever state Langfuse is in.
        True when everything was delivered in time; late work is abandoned on daemon threads."""
        if self._closed or self._tracer is None:
            return True
        self._closed = True
        deadline = time.monotonic() + timeout_s
        exporter_done = threading.Event()

        def stop_exporters() -> None:
            try:
                if self._provider is not None:
                    self._provider.shutdown()  # ends every processor, Langfuse's batch exporter included
                if self._langfuse is not None:
                    self._langfuse.shutdown()
            except Exception:
                log.debug("tracing: exporter shutdown failed", exc_info=True)
            finally:
                exporter_done.set()

        try:
            if self._instrumentor is not None:
                self._instrumentor.uninstrument()
        except Exception:
            log.debug("tracing: uninstrument failed", exc_info=True)
        threading.Thread(target=stop_exporters, name="crewguard-trace-shutdown", daemon=True).start()
        feed_ok = self._writer.close(max(0.0, deadline - time.monotonic())) if self._writer else True
        exported = exporter_done.wait(max(0.0, deadline - time.monotonic()))
        if not exported:
            log.warning(
                "tracing: Langfuse export did not finish within %.1f s; pending spans dropped", timeout_s
            )
        _forget_langfuse_client(self._langfuse)
        return feed_ok and exported


def _forget_langfuse_client(client: Any | None) -> None:
    """Drop the SDK's per-key singleton and its atexit flush, so exit is never held up by it and a
    later start in the same process gets a fresh client. (Private SDK state: guarded.)"""
    resources = getattr(client, "_resources", None)
    if resources is None:
        return
    try:
        atexit.unregister(resources.shutdown)
        from langfuse._client.resource_manager import LangfuseResourceManager

        with LangfuseResourceManager._lock:
            if LangfuseResourceManager._instances.get(resources.public_key) is resources:
                del LangfuseResourceManager._instances[resources.public_key]
    except Exception:
        log.debug("tracing: could not release the Langfuse client", exc_info=True)


def _langfuse_client(settings: Settings, provider: Any) -> Any | None:
    lf = settings.tracing.langfuse
    public_key = os.environ.get(LANGFUSE_PUBLIC_KEY_ENV)
    secret_key = os.environ.get(LANGFUSE_SECRET_KEY_ENV)
    if not lf.enabled:
        return None
    if not public_key or not secret_key:
        log.warning(
            "tracing: Langfuse is enabled but %s / %s are not set",
            LANGFUSE_PUBLIC_KEY_ENV,
            LANGFUSE_SECRET_KEY_ENV,
        )
        return None
    from langfuse import Langfuse
    from langfuse._client.resource_manager import LangfuseResourceManager

    # The SDK keeps one client per public key per process; one inherited through fork (dead threads,
    # another provider) or made for reading (tracing off) would silently be reused: start fresh.
    with LangfuseResourceManager._lock:
        LangfuseResourceManager._instances.pop(public_key, None)
    base_url = os.environ.get(LANGFUSE_BASE_URL_ENV) or lf.base_url or None
    client = Langfuse(
        public_key=public_key,
        secret_key=secret_key,
        base_url=base_url,
        flush_interval=lf.flush_interval_s,
        timeout=lf.timeout_s,  # type: ignore[arg-type]  # the OTLP exporter takes float seconds
        mask_otel_spans=langfuse_span_masker(settings.tracing.mask),
        should_export_span=_export_span,
        tracer_provider=provider,
    )
    resources = getattr(client, "_resources", None)
    if resources is not None:  # our shutdown is bounded; the SDK's atexit flush is not
        atexit.unregister(resources.shutdown)
    return client


def start_tracing(settings: Settings, engine: Engine | None) -> TracingHandle:
    """Set up tracing in this (child) process. Never raises: on any failure, a no-op handle.

    settings: `settings.tracing` (local_feed, mask, prices, langfuse). engine: the ledger for the
    local feed and per-run usage (None: neither is written).
    """
    os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # never OTEL_SDK_DISABLED: it kills ours too
    writer = None
    try:
        from openinference.instrumentation.crewai import CrewAIInstrumentor
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider(shutdown_on_exit=False)  # exit is bounded by our own shutdown
        usage = UsageBook()
        writer = (
            FeedWriter(engine, usage, store_events=settings.tracing.local_feed)
            if engine is not None
            else None
        )
        current = CurrentRun()
        feed = LocalFeedProcessor(
            usage=usage,
            prices=PriceTable(settings.tracing.prices),
            writer=writer,
            mask_mode=settings.tracing.mask,
            current_run=current.get,
        )
        provider.add_span_processor(feed)
        langfuse = None
        try:
            langfuse = _langfuse_client(settings, provider)
        except Exception:
            log.warning("tracing: Langfuse client could not start; continuing without it", exc_info=True)
        instrumentor = CrewAIInstrumentor()
        instrumentor.instrument(tracer_provider=provider, use_event_listener=True, skip_dep_check=True)
        return TracingHandle(
            provider=provider,
            tracer=provider.get_tracer(spans.FLOW_SCOPE),
            feed=feed,
            writer=writer,
            usage=usage,
            langfuse=langfuse,
            instrumentor=instrumentor,
            current=current,
        )
    except Exception:
        log.warning("tracing: setup failed; this process runs untraced", exc_info=True)
        if writer is not None:
            writer.close(0.0)
        return TracingHandle()
