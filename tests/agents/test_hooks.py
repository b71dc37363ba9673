"""The run guards: budget accounting and limits, cancel switch, tool allowlist (no LLM needed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from crewai.hooks import HookAborted

from crewguard.agents import hooks
from crewguard.agents.hooks import RunBudget, guard_model_call, guard_tool_call, run_scope
from crewguard.clock import FakeClock


class FakeLlm:
    """An LLM-shaped object whose cumulative usage the test controls."""

    def __init__(self) -> None:
        self.total = 0

    def get_token_usage_summary(self) -> Any:
        return SimpleNamespace(total_tokens=self.total)


def model_ctx(llm: Any = None, text: str = "hi") -> Any:
    return SimpleNamespace(llm=llm, messages=[{"role": "user", "content": text}])


@pytest.fixture(autouse=True)
def _no_cancel() -> Any:
    hooks.reset_cancel()
    yield
    hooks.reset_cancel()


def test_counts_calls_and_stops_at_the_limit() -> None:
    budget = RunBudget(max_llm_calls=2, max_tokens=10_000, max_wall_s=60)
    with run_scope(budget):
        guard_model_call(model_ctx())
        guard_model_call(model_ctx())
        with pytest.raises(HookAborted, match="^budget: 2 LLM calls") as info:
            guard_model_call(model_ctx())
    assert info.value.source == hooks.SOURCE_BUDGET
    assert budget.llm_calls == 2


def test_tokens_from_llm_usage_counted_once_and_next_prompt_estimated() -> None:
    llm = FakeLlm()
    budget = RunBudget(max_llm_calls=10, max_tokens=1000, max_wall_s=60)
    with run_scope(budget):
        guard_model_call(model_ctx(llm))
        llm.total = 600
        guard_model_call(model_ctx(llm))
        guard_model_call(model_ctx(llm))  # same cumulative usage: not counted again
        assert budget.tokens == 600
        with pytest.raises(HookAborted, match="tokens"):
            guard_model_call(model_ctx(llm, "x" * 2000))  # ~500 tokens more would pass 1000


def test_wall_time_from_first_call() -> None:
    clock = FakeClock()
    budget = RunBudget(max_llm_calls=10, max_tokens=1000, max_wall_s=30, clock=clock)
    with run_scope(budget):
        guard_model_call(model_ctx())
        clock.advance(31)
        with pytest.raises(HookAborted, match="elapsed"):
            guard_model_call(model_ctx())


def test_no_scope_no_budget() -> None:
    for _ in range(50):
        guard_model_call(model_ctx())  # outside a run nothing is counted or refused
    guard_tool_call(SimpleNamespace(tool_name="anything"))


def test_cancel_switch_stops_model_and_tool_calls() -> None:
    hooks.request_cancel("operator asked")
    with pytest.raises(HookAborted, match="^cancelled: operator asked"):
        guard_model_call(model_ctx())
    with pytest.raises(HookAborted, match="^cancelled"):
        guard_tool_call(SimpleNamespace(tool_name="search_knowledge_base"))


def test_tool_allowlist_refuses_and_the_next_model_call_ends_the_run() -> None:
    budget = RunBudget(10, 10_000, 60, allowed_tools=frozenset({"search_knowledge_base"}))
    with run_scope(budget):
        guard_tool_call(SimpleNamespace(tool_name="search_knowledge_base"))
        with pytest.raises(HookAborted, match="tool_not_allowed"):
            guard_tool_call(SimpleNamespace(tool_name="delete_all_tickets"))
        with pytest.raises(HookAborted, match="tool_not_allowed") as info:
            guard_model_call(model_ctx())
    assert budget.refused_tools == ["delete_all_tickets"]
    assert info.value.source == hooks.SOURCE_TOOLS
