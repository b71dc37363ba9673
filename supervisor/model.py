"""What the supervisor looks at and what it concludes: runs, observations, findings, snapshots.

Plain dataclasses so detectors are pure functions of a `Snapshot` and tests build one by hand.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

#: Observation kinds the detectors care about (trace_events.kind / Langfuse type mapped to these).
LLM = "LLM"
TOOL = "TOOL"

#: Actions a finding asks for.
Action = Literal["kill", "page"]

#: How long the fleet statistics remember completed LLM calls (baselines look this far back).
FLEET_HORIZON_S = 1800.0
#: The newest this many completed calls form the fleet's per-call token baseline.
FLEET_BASELINE_CALLS = 500


@dataclass(slots=True)  # not frozen: frozen dataclasses are slow to build and scans build 10,000s
class ActiveRun:
    """A run that has not ended (runs.ended_at IS NULL), joined with its job."""

    run_id: str
    job_id: int | None
    email_key: str | None
    started_at: float
    last_progress_at: float | None = None
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    pid: int | None = None
    host: str | None = None


@dataclass(slots=True)
class RunningJob:
    """A job in state running: who owns it and where its process group lives."""

    job_id: int
    email_key: str
    run_id: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    host: str | None
    pid: int | None
    pgid: int | None
    attempts: int = 1
    max_attempts: int = 1
    kill_requested_at: float | None = None
    kill_incident_id: int | None = None


@dataclass(slots=True)
class Observation:
    """One LLM/tool/agent span of a run; `ended_at` is None while the call is in flight."""

    run_id: str
    span_id: str
    kind: str  # LLM | TOOL | AGENT | CHAIN | FLOW
    name: str
    started_at: float
    ended_at: float | None = None
    tool: str | None = None
    args_key: str | None = None  # hash of the normalized tool arguments
    args_shape: str | None = None  # the same hash with numbers blanked (near repeats)
    prompt_sha: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    seq: int = 0  # arrival order, breaks ties between equal start times

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def last_event_at(self) -> float:
        return self.ended_at if self.ended_at is not None else self.started_at


@dataclass(frozen=True)
class Finding:
    """A problem a detector saw; `dedupe_key` names the problem so it opens one incident."""

    kind: str  # loop | budget | token_spike | stall | error_burst | queue_depth | queue_age
    dedupe_key: str
    summary: str
    action: Action
    run_id: str | None = None
    job_id: int | None = None
    email_key: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return "critical" if self.action == "kill" else "warning"


@dataclass(frozen=True)
class CompletedCall:
    ended_at: float
    tokens: int
    error: bool
    run_id: str


class FleetStats:
    """A rolling window of completed LLM calls across all runs (fed once per span)."""

    def __init__(self, horizon_s: float = FLEET_HORIZON_S) -> None:
        self.horizon_s = horizon_s
        self._calls: deque[CompletedCall] = deque()  # ordered by arrival, roughly by ended_at
        self._seen: dict[tuple[str, str], float] = {}

    def observe(self, observations: dict[str, list[Observation]]) -> None:
        for run_obs in observations.values():
            for ob in run_obs:
                if ob.kind != LLM or ob.ended_at is None:
                    continue
                key = (ob.run_id, ob.span_id)
                if key in self._seen:
                    continue
                self._seen[key] = ob.ended_at
                self._calls.append(CompletedCall(ob.ended_at, ob.total_tokens, bool(ob.error), ob.run_id))

    def prune(self, now: float) -> None:
        cutoff = now - self.horizon_s
        while self._calls and self._calls[0].ended_at < cutoff:
            self._calls.popleft()
        if len(self._seen) > 2 * len(self._calls) + 1000:
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}

    @property
    def calls(self) -> list[CompletedCall]:
        return list(self._calls)

    def recent_tokens(self, limit: int = FLEET_BASELINE_CALLS) -> list[int]:
        calls = self._calls
        start = max(0, len(calls) - limit)
        return [calls[i].tokens for i in range(start, len(calls))]

    def errors_since(self, since: float) -> int:
        return sum(1 for c in self._calls if c.error and c.ended_at >= since)

    def tokens_per_minute(self, now: float) -> tuple[int, list[int]]:
        """Tokens in the last minute, and per-minute totals for the minutes before it (oldest first)."""
        if not self._calls:
            return 0, []
        first = min(c.ended_at for c in self._calls)
        current = 0
        buckets: dict[int, int] = {}
        for c in self._calls:
            age = now - c.ended_at
            if age < 0:
                age = 0.0
            if age < 60.0:
                current += c.tokens
            else:
                buckets[int(age // 60.0)] = buckets.get(int(age // 60.0), 0) + c.tokens
        # Only full minutes since the first call we saw count (no invented idle history).
        full_minutes = int((now - first) // 60.0)
        history = [buckets.get(m, 0) for m in range(full_minutes, 0, -1)]
        return current, history


@dataclass
class Snapshot:
    """Everything one scan knows, read once; detectors only look at this."""

    now: float
    runs: dict[str, ActiveRun] = field(default_factory=dict)
    observations: dict[str, list[Observation]] = field(default_factory=dict)
    observations_ok: bool = True  # False when the trace source failed this scan
    jobs: dict[int, RunningJob] = field(default_factory=dict)
    heartbeats: dict[str, float] = field(default_factory=dict)  # component -> last beat
    fleet: FleetStats = field(default_factory=FleetStats)
    finished: list[tuple[float, str | None]] = field(default_factory=list)  # (ended_at, outcome)
    review_open: int = 0
    review_oldest_at: float | None = None
    queued_oldest_at: float | None = None

    def observation_count(self) -> int:
        return sum(len(v) for v in self.observations.values())


def median_mad(values: list[float] | list[int]) -> tuple[float, float]:
    """Median and median absolute deviation: a baseline one outlier cannot move."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values])
    return float(med), float(mad)


def insort_observation(run_obs: list[Observation], ob: Observation) -> None:
    """Keep a run's observations ordered by (started_at, seq)."""
    if not run_obs or (run_obs[-1].started_at, run_obs[-1].seq) <= (ob.started_at, ob.seq):
        run_obs.append(ob)
        return
    keys = [(o.started_at, o.seq) for o in run_obs]
    run_obs.insert(bisect.bisect_right(keys, (ob.started_at, ob.seq)), ob)


def owner_dead_reason(
    owner: str | None, beat_at: float | None, lease_expires_at: float | None, now: float, timeout_s: float
) -> str | None:
    """Why a job's owning daemon looks dead (its heartbeat is stale or its lease expired), or None."""
    if beat_at is not None and now - beat_at > timeout_s:
        return f"heartbeat of {owner} {now - beat_at:.0f} s old"
    if lease_expires_at is not None and lease_expires_at < now:
        return f"lease of {owner or 'no owner'} expired {now - lease_expires_at:.0f} s ago"
    return None
