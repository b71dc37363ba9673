"""Per-run accounting from spans: LLM calls, tool calls, tokens, cost, last progress.

The feed processor adds to a `UsageBook` on the span hot path (in memory, a lock held for
microseconds); the feed writer takes the not-yet-written part and adds it to the run's ledger
row in the same short transaction as the trace events. A failed write gives the part back, so
counters are late when the ledger is busy, never lost or counted twice.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields

from sqlalchemy import Connection

from crewguard.crew.ledger.schema import runs
from crewguard.settings import Price


class PriceTable:
    """Cost per model from settings.tracing.prices.

    Keys are model names as configured ("openai/gpt-4o-mini"); spans name the model with or without
    the provider prefix ("gpt-4o-mini"), so both spellings match.
    """

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices: dict[str, Price] = {}
        for name, price in prices.items():
            self._prices.setdefault(name, price)
            self._prices.setdefault(name.split("/", 1)[-1], price)

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        return self._prices.get(model) or self._prices.get(model.split("/", 1)[-1])

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call; 0.0 for a model without a configured price."""
        price = self.price(model)
        if price is None:
            return 0.0
        return prompt_tokens / 1000 * price.prompt_per_1k + completion_tokens / 1000 * price.completion_per_1k


@dataclass
class RunUsage:
    llm_calls: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    progress_at: float | None = None  # when the run last did something (span start or end)

    def add(self, other: RunUsage) -> None:
        for f in fields(self):
            if f.name != "progress_at":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        if other.progress_at is not None:
            self.progress_at = max(self.progress_at or 0.0, other.progress_at)

    def is_empty(self) -> bool:
        return self == RunUsage()


class UsageBook:
    """Thread-safe per-run totals plus the part not yet written to the ledger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, RunUsage] = {}
        self._pending: dict[str, RunUsage] = {}

    def add(self, run_id: str, usage: RunUsage) -> None:
        with self._lock:
            self._totals.setdefault(run_id, RunUsage()).add(usage)
            self._pending.setdefault(run_id, RunUsage()).add(usage)

    def totals(self, run_id: str) -> RunUsage:
        with self._lock:
            total = RunUsage()
            total.add(self._totals.get(run_id, RunUsage()))
            return total

    def take_pending(self) -> dict[str, RunUsage]:
        """The unwritten part of every run (now owned by the caller)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return {run_id: usage for run_id, usage in pending.items() if not usage.is_empty()}

    def give_back(self, pending: Mapping[str, RunUsage]) -> None:
        """Return a part whose write failed; it is written with the next batch."""
        with self._lock:
            for run_id, usage in pending.items():
                self._pending.setdefault(run_id, RunUsage()).add(usage)

    def has_pending(self) -> bool:
        with self._lock:
            return any(not u.is_empty() for u in self._pending.values())


def write_usage(conn: Connection, run_id: str, usage: RunUsage) -> None:
    """Add `usage` to the run's row (inside the caller's transaction)."""
    from crewguard.crew.ledger.jobs import update_run_usage

    update_run_usage(
        conn,
        run_id,
        llm_calls=usage.llm_calls,
        tool_calls=usage.tool_calls,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=usage.cost_usd,
        progress_at=usage.progress_at,
    )


def write_wall_time(conn: Connection, run_id: str, wall_s: float) -> None:
    """Set the run's wall time unless the ledger already closed the run with its own figure."""
    conn.execute(runs.update().where(runs.c.id == run_id, runs.c.wall_s.is_(None)).values(wall_s=wall_s))
