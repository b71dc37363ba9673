"""Trace sources: the local real-time feed in the ledger, or Langfuse's observations API."""

from crewguard.supervisor.sources.base import SourceUnavailable, TraceSource, content_key

__all__ = ["SourceUnavailable", "TraceSource", "content_key"]
