"""classify_with_llm: one attempt of the real crew against the scenario LLM, every failure mapped."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from crewguard.agents import hooks
from crewguard.agents.classify import Classification, LlmClassificationError, classify_with_llm
from crewguard.agents.hooks import RunBudget
from crewguard.llm_sim import ScenarioLLM
from crewguard.settings import Settings

from .conftest import email

REFUND = ("Refund for invoice 42", "I was charged twice for invoice 42, please refund the second charge.")


def attempt(settings: Settings, budget: RunBudget | None = None) -> Classification | LlmClassificationError:
    budget = budget or RunBudget.from_settings(settings)
    try:
        return classify_with_llm(email(*REFUND), settings, budget=budget)
    except LlmClassificationError as exc:
        return exc


def test_normal_answer_is_validated_and_accounted(sim_settings: Callable[..., Settings]) -> None:
    settings = sim_settings("normal")
    budget = RunBudget.from_settings(settings)
    result = attempt(settings, budget)
    assert result == Classification("invoice", "billing", result.confidence, result.reason, "llm")
    assert budget.llm_calls == 4  # two tasks: one tool call and one answer each
    assert budget.tokens > 0
    assert budget.allowed_tools == {"lookup_sender_history", "search_knowledge_base"}


@pytest.mark.parametrize(
    ("scenario", "kind", "retryable"),
    [
        ("out_of_bounds", "out_of_bounds", False),
        ("bad_json_answer", "bad_output", False),
        ("error_500", "server_error", True),
        ("malformed", "server_error", True),
        ("loop", "budget", False),
        ("token_spike", "budget", False),
    ],
)
def test_failures_are_mapped(
    sim_settings: Callable[..., Settings], scenario: str, kind: str, retryable: bool
) -> None:
    result = attempt(sim_settings(scenario))
    assert isinstance(result, LlmClassificationError), result
    assert (result.kind, result.retryable) == (kind, retryable), str(result)


def test_rate_limit_surfaces_once_with_retry_after(
    sim: ScenarioLLM, sim_settings: Callable[..., Settings]
) -> None:
    before = len(sim.requests)
    result = attempt(sim_settings("rate_limit"))
    assert isinstance(result, LlmClassificationError)
    assert (result.kind, result.retryable, result.retry_after) == ("rate_limited", True, 1.0)
    assert len(sim.requests) - before == 1  # no hidden SDK or CrewAI retries: retries are the caller's


def test_timeout(sim_settings: Callable[..., Settings]) -> None:
    result = attempt(sim_settings("hang=10", timeout_s=0.5))
    assert isinstance(result, LlmClassificationError)
    assert (result.kind, result.retryable) == ("timeout", True)


def test_caller_retry_gets_a_fresh_crew(sim_settings: Callable[..., Settings]) -> None:
    settings = sim_settings("flaky_500")  # first request of each email fails
    budget = RunBudget.from_settings(settings)
    the_email = email(*REFUND)
    with pytest.raises(LlmClassificationError) as first:
        classify_with_llm(the_email, settings, budget=budget)
    assert first.value.kind == "server_error"
    second = classify_with_llm(
        the_email, settings, budget=budget
    )  # a reused agent would have no retries left
    assert second.category == "invoice"
    assert budget.llm_calls == 5  # the budget spans the run's attempts


def test_budget_spans_attempts(sim_settings: Callable[..., Settings]) -> None:
    settings = sim_settings("normal")
    budget = RunBudget(max_llm_calls=6, max_tokens=100_000, max_wall_s=60)
    assert isinstance(attempt(settings, budget), Classification)  # 4 calls
    result = attempt(settings, budget)  # 2 more are allowed, the 3rd is refused
    assert isinstance(result, LlmClassificationError) and result.kind == "budget"
    assert budget.llm_calls == 6


def test_cancel_from_another_thread_stops_at_the_next_call(sim_settings: Callable[..., Settings]) -> None:
    settings = sim_settings("slow=0.5")  # four calls of 0.5 s
    timer = threading.Timer(0.2, hooks.request_cancel, args=("operator",))
    timer.start()
    try:
        result = attempt(settings)
    finally:
        timer.cancel()
    assert isinstance(result, LlmClassificationError)
    assert result.kind == "aborted" and "cancelled: operator" in str(result)


def test_error_message_has_no_api_key(
    sim_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sim_settings("error_500")
    monkeypatch.setenv(settings.llm.api_key_env, "sk-live-TOPSECRET0123456789")
    result = attempt(settings)
    assert isinstance(result, LlmClassificationError)
    assert "TOPSECRET" not in str(result) and "TOPSECRET" not in repr(result.args)
