"""Run-time guards on every LLM and tool call: cancel switch, per-run budget, tool allowlist.

The hooks are registered ONCE, when this module is imported, with `crewai.hooks.on`: never per
crew (hook methods on a @CrewBase class are re-registered for every instance and never removed,
research/crewai.md §7). They act on the run made current by `run_scope(budget)`, which
`classify_with_llm` enters around each kickoff; outside a run scope only the cancel switch acts.

A PRE_MODEL_CALL hook raising HookAborted stops the kickoff (it propagates out of `kickoff()`).
A PRE_TOOL_CALL abort only blocks that one tool call (CrewAI turns it into a "blocked" tool
result), so a refused tool is also recorded on the budget and the next model call aborts the run.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from crewai.hooks import HookAborted, InterceptionPoint, on

from crewguard.clock import SYSTEM_CLOCK, Clock

#: Characters per token when estimating the size of the prompt about to be sent.
CHARS_PER_TOKEN = 4
#: HookAborted.source values, so callers can tell why a run stopped.
SOURCE_CANCEL = "crewguard-cancel"
SOURCE_BUDGET = "crewguard-budget"
SOURCE_TOOLS = "crewguard-tool-allowlist"

#: The process-wide cancel switch: set it (from any thread) to stop the run at its next LLM/tool call.
CANCEL = threading.Event()
_cancel_reason = "cancel requested"


def request_cancel(reason: str = "cancel requested") -> None:
    """Stop the current run at its next LLM or tool boundary (one job per process: global is right)."""
    global _cancel_reason
    _cancel_reason = reason
    CANCEL.set()


def reset_cancel() -> None:
    CANCEL.clear()


@dataclass
class RunBudget:
    """Limits and accounting for one run (all attempts of one email in one job).

    max_llm_calls: model calls allowed in the run, every crew attempt included
    max_tokens: prompt+completion tokens allowed (the next prompt's estimate is counted before it is sent)
    max_wall_s: seconds from the run's first model call
    allowed_tools: tool names the run may call; set by classify_with_llm from the tools actually given
    clock: time source for the wall-time limit
    """

    max_llm_calls: int
    max_tokens: int
    max_wall_s: float
    allowed_tools: frozenset[str] = frozenset()
    clock: Clock = SYSTEM_CLOCK
    llm_calls: int = 0
    tokens: int = 0
    started_at: float | None = None
    refused_tools: list[str] = field(default_factory=list)
    # tokens already reported by each LLM object (cumulative usage, counted once)
    _seen_usage: dict[int, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: Any, clock: Clock = SYSTEM_CLOCK) -> RunBudget:
        b = settings.budgets
        return cls(b.max_llm_calls, b.max_tokens, b.max_wall_s, clock=clock)

    def add_usage(self, llm: Any) -> None:
        """Fold in the LLM object's cumulative token usage (CrewAI tracks it per LLM instance)."""
        summary = getattr(llm, "get_token_usage_summary", None)
        if summary is None:
            return
        try:
            total = int(summary().total_tokens)
        except Exception:  # an LLM without usage tracking: the prompt estimate still counts
            return
        with self._lock:
            previous = self._seen_usage.get(id(llm), 0)
            if total > previous:
                self.tokens += total - previous
                self._seen_usage[id(llm)] = total

    def before_model_call(self, llm: Any, messages: list[Any]) -> None:
        """Count one model call; raise HookAborted when the run is over a limit."""
        self.add_usage(llm)
        now = self.clock.now()
        with self._lock:
            if self.started_at is None:
                self.started_at = now
            if self.refused_tools:
                raise HookAborted(
                    f"tool_not_allowed: the model called {self.refused_tools[0]!r}", SOURCE_TOOLS
                )
            if self.llm_calls >= self.max_llm_calls:
                raise HookAborted(
                    f"budget: {self.llm_calls} LLM calls used of {self.max_llm_calls}", SOURCE_BUDGET
                )
            pending = estimate_tokens(messages)
            if self.tokens + pending > self.max_tokens:
                raise HookAborted(
                    f"budget: {self.tokens} tokens used + ~{pending} in the next prompt > {self.max_tokens}",
                    SOURCE_BUDGET,
                )
            elapsed = now - self.started_at
            if elapsed > self.max_wall_s:
                raise HookAborted(f"budget: {elapsed:.1f} s elapsed > {self.max_wall_s} s", SOURCE_BUDGET)
            self.llm_calls += 1


def estimate_tokens(messages: list[Any]) -> int:
    """A rough token count of chat messages (content characters / CHARS_PER_TOKEN)."""
    chars = 0
    for message in messages or ():
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(part)) for part in content)
    return chars // CHARS_PER_TOKEN


_current: contextvars.ContextVar[RunBudget | None] = contextvars.ContextVar(
    "crewguard_run_budget", default=None
)


@contextmanager
def run_scope(budget: RunBudget) -> Iterator[RunBudget]:
    """Make `budget` the current run for the hooks, in this context (and contexts copied from it)."""
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


def current_budget() -> RunBudget | None:
    return _current.get()


def _check_cancel() -> None:
    if CANCEL.is_set():
        raise HookAborted(f"cancelled: {_cancel_reason}", SOURCE_CANCEL)


@on(InterceptionPoint.PRE_MODEL_CALL)
def guard_model_call(ctx: Any) -> None:
    """Cancel switch, then the run's budget (which also ends a run that tried a refused tool)."""
    _check_cancel()
    budget = _current.get()
    if budget is not None:
        budget.before_model_call(getattr(ctx, "llm", None), getattr(ctx, "messages", []))


@on(InterceptionPoint.PRE_TOOL_CALL)
def guard_tool_call(ctx: Any) -> None:
    """Cancel switch, then the run's tool allowlist."""
    _check_cancel()
    budget = _current.get()
    name = str(getattr(ctx, "tool_name", ""))
    if budget is not None and name not in budget.allowed_tools:
        with budget._lock:
            budget.refused_tools.append(name)
        raise HookAborted(f"tool_not_allowed: {name!r} is not in this run's allowlist", SOURCE_TOOLS)


#: The hooks this module registered, per interception point (tests count them in CrewAI's registry).
REGISTERED_HOOKS = {
    InterceptionPoint.PRE_MODEL_CALL: guard_model_call,
    InterceptionPoint.PRE_TOOL_CALL: guard_tool_call,
}
