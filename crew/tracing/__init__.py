"""Tracing of the crew: OpenTelemetry spans to Langfuse and to the ledger's real-time feed.

`start_tracing(settings, engine)` once per child process; `handle.run_scope(...)` around a run,
`handle.step(...)` / `handle.event(...)` for flow steps, `handle.shutdown(timeout_s)` at the end.
"""

from crewguard.crew.tracing.setup import TracingHandle, start_tracing

__all__ = ["TracingHandle", "start_tracing"]
