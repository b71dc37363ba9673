"""Langfuse as the trace source: `GET /api/public/v2/observations` through the official SDK client.

One query per poll for all active runs (fromStartTime = the oldest active run's start, so a long
span that started before any sliding window is still seen), cursor paging, grouped client-side by
session id (= run id). Cloud rate limits are low (30-1000 req/min per organization), so polls are
spaced by `settings.supervisor.langfuse_poll_s` and a 429's Retry-After is honoured. In-flight spans
are invisible here (Langfuse receives a span when it ends): "alive" comes from the ledger.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from langfuse.api import LangfuseAPI
from langfuse.api.core.api_error import ApiError

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.settings import Settings
from crewguard.supervisor.model import LLM, TOOL, ActiveRun, Observation, insort_observation
from crewguard.supervisor.sources.base import SourceUnavailable, content_key, shape_key

log = logging.getLogger(__name__)

#: Field groups requested: ids and times, io (tool args / prompts), metadata (run id), model, usage.
OBSERVATION_FIELDS = "core,basic,time,io,metadata,model,usage"
#: Rows per page (the API's maximum is 1000; io makes rows large and responses are capped at 5 MB).
PAGE_LIMIT = 500
#: A poll never follows more cursors than this (a guard against a server that keeps paging).
MAX_PAGES = 200
#: Per-request timeout; the SDK's own retries are off (max_retries 0): pacing is ours.
REQUEST_TIMEOUT_S = 5
#: Wait after a 429 without a usable Retry-After header.
DEFAULT_RETRY_AFTER_S = 10.0
#: Spans may carry start times slightly before the run row's start (clock skew between hosts).
START_SKEW_S = 5.0

#: Langfuse observation type -> our kind.
_KINDS = {"GENERATION": LLM, "TOOL": TOOL, "AGENT": "AGENT", "CHAIN": "CHAIN", "SPAN": "CHAIN"}


class LangfuseSource:
    """Polls Langfuse at most every `min_poll_s`; between polls it answers from the last result."""

    def __init__(
        self,
        settings: Settings,
        *,
        api: LangfuseAPI | None = None,
        clock: Clock = SYSTEM_CLOCK,
        min_poll_s: float | None = None,
    ) -> None:
        """`api`: a ready client (tests); default: built from LANGFUSE_* env and settings.tracing.langfuse."""
        self.api = api or _client_from_env(settings)
        self.clock = clock
        self.min_poll_s = settings.supervisor.langfuse_poll_s if min_poll_s is None else min_poll_s
        self._cache: dict[str, list[Observation]] = {}
        self._next_poll_at = 0.0
        self.polls = 0
        self.requests = 0

    def observations_for(self, active_runs: Mapping[str, ActiveRun]) -> dict[str, list[Observation]]:
        now = self.clock.now()
        if not active_runs:
            self._cache = {}
            return {}
        if now >= self._next_poll_at:
            oldest = min(r.started_at for r in active_runs.values()) - START_SKEW_S
            # Space polls even when this one fails, so a broken Langfuse is not hammered.
            self._next_poll_at = now + self.min_poll_s
            self._cache = self._poll(oldest, active_runs)
            self.polls += 1
        return {rid: obs for rid, obs in self._cache.items() if rid in active_runs}

    def _poll(self, from_start: float, active_runs: Mapping[str, ActiveRun]) -> dict[str, list[Observation]]:
        grouped: dict[str, list[Observation]] = {}
        cursor: str | None = None
        seq = 0
        for _page in range(MAX_PAGES):
            self.requests += 1
            try:
                resp = self.api.observations.get_many(
                    fields=OBSERVATION_FIELDS,
                    limit=PAGE_LIMIT,
                    cursor=cursor,
                    from_start_time=datetime.fromtimestamp(from_start, tz=UTC),
                    request_options={"max_retries": 0, "timeout_in_seconds": REQUEST_TIMEOUT_S},
                )
            except ApiError as exc:
                if exc.status_code == 429:
                    wait = _retry_after(exc.headers)
                    self._next_poll_at = max(self._next_poll_at, self.clock.now() + wait)
                    raise SourceUnavailable(f"Langfuse rate limit (429), retry in {wait:g} s", wait) from None
                raise SourceUnavailable(f"Langfuse answered HTTP {exc.status_code}") from None
            except (httpx.HTTPError, ValueError) as exc:
                raise SourceUnavailable(f"Langfuse unreachable: {type(exc).__name__}") from None
            for row in resp.data:
                seq += 1
                ob = _observation(row, seq)
                if ob is not None and ob.run_id in active_runs:
                    insort_observation(grouped.setdefault(ob.run_id, []), ob)
            cursor = resp.meta.cursor
            if not cursor:
                break
        else:
            log.warning("Langfuse poll stopped after %d pages", MAX_PAGES)
        return grouped


def _client_from_env(settings: Settings) -> LangfuseAPI:
    base_url = os.environ.get("LANGFUSE_BASE_URL") or settings.tracing.langfuse.base_url
    public_key = os.environ.get("LANGFUSE_PUBLIC_KEY", "")
    secret_key = os.environ.get("LANGFUSE_SECRET_KEY", "")
    if not base_url or not public_key or not secret_key:
        raise ValueError(
            "supervisor.source is langfuse but LANGFUSE_BASE_URL (or tracing.langfuse.base_url), "
            "LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY are not all set"
        )
    # The REST client alone: no OTel tracer provider is installed in the supervisor.
    return LangfuseAPI(
        base_url=base_url,
        username=public_key,
        password=secret_key,
        x_langfuse_public_key=public_key,
        timeout=REQUEST_TIMEOUT_S,
    )


def _retry_after(headers: Mapping[str, str] | None) -> float:
    for key, value in (headers or {}).items():
        if key.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return DEFAULT_RETRY_AFTER_S
    return DEFAULT_RETRY_AFTER_S


def _observation(row: Any, seq: int) -> Observation | None:
    metadata = row.metadata if isinstance(getattr(row, "metadata", None), dict) else {}
    run_id = getattr(row, "session_id", None) or metadata.get("run_id")
    if not run_id or row.start_time is None:
        return None
    kind = _KINDS.get(str(row.type).upper(), str(row.type).upper())
    usage = getattr(row, "usage_details", None) or {}
    prompt_tokens = int(usage.get("input", 0) or 0)
    completion_tokens = int(usage.get("output", 0) or 0)
    if not prompt_tokens and not completion_tokens:
        prompt_tokens = int(usage.get("total", 0) or 0)
    error = None
    if getattr(row, "level", None) == "ERROR":
        error = getattr(row, "status_message", None) or "error"
    data_in = getattr(row, "input", None)
    end = getattr(row, "end_time", None)
    name = row.name or ""
    return Observation(
        run_id=str(run_id),
        span_id=row.id,
        kind=kind,
        name=name,
        started_at=row.start_time.timestamp(),
        ended_at=end.timestamp() if end is not None else None,
        tool=name if kind == TOOL else None,
        args_key=content_key(data_in) if kind == TOOL else None,
        args_shape=shape_key(data_in) if kind == TOOL else None,
        prompt_sha=content_key(data_in) if kind == LLM and data_in else None,
        model=getattr(row, "model", None),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        error=error,
        seq=seq,
    )
