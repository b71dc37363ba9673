"""The LLM's answer is parsed from output.raw and must stay within the configuration."""

from __future__ import annotations

import json

import openai
import pytest
from crewai.hooks import HookAborted

from crewguard.agents.classify import LlmClassificationError, error_from_exception, parse_llm_answer
from crewguard.agents.hooks import SOURCE_BUDGET, SOURCE_CANCEL, SOURCE_TOOLS
from crewguard.settings import Settings, load_settings


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


def answer(**fields: object) -> str:
    base = {"category": "invoice", "team": "billing", "confidence": 0.8, "reason": "charged twice"}
    base.update(fields)
    return json.dumps(base)


def test_valid_answer(settings: Settings) -> None:
    result = parse_llm_answer(answer(), settings)
    assert (result.category, result.team, result.confidence, result.classifier) == (
        "invoice",
        "billing",
        0.8,
        "llm",
    )


@pytest.mark.parametrize(
    "raw",
    [
        f"```json\n{answer()}\n```",
        f"```\n{answer()}\n```",
        f"Here you go:\n{answer()}\nThanks",
        f"  {answer()}  ",
    ],
)
def test_fences_and_prose_around_json(settings: Settings, raw: str) -> None:
    assert parse_llm_answer(raw, settings).category == "invoice"


@pytest.mark.parametrize(
    "fields",
    [
        {"team": "ceo-office"},  # unconfigured team
        {"category": "executive-escalation"},  # unconfigured category
        {"category": "executive-escalation", "team": "ceo-office"},
        {"team": "technical"},  # configured team, but not the category's team
        {"category": "outage"},  # configured category owned by another team
    ],
)
def test_out_of_bounds_is_rejected(settings: Settings, fields: dict[str, object]) -> None:
    with pytest.raises(LlmClassificationError) as info:
        parse_llm_answer(answer(**fields), settings)
    assert info.value.kind == "out_of_bounds" and not info.value.retryable


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "I would send this to billing.",
        "[1, 2]",
        answer(confidence=1.5),
        answer(confidence="high"),
        answer(confidence=True),
        json.dumps({"category": "invoice"}),
        answer(team=["billing"]),
    ],
)
def test_bad_output_is_rejected(settings: Settings, raw: str) -> None:
    with pytest.raises(LlmClassificationError) as info:
        parse_llm_answer(raw, settings)
    assert info.value.kind == "bad_output" and not info.value.retryable


def test_long_reason_is_capped(settings: Settings) -> None:
    assert len(parse_llm_answer(answer(reason="r" * 5000), settings).reason) == 500


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as exc:
        return exc


def test_error_mapping(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    r429 = httpx.Response(429, headers={"retry-after": "7"}, request=request)
    r503 = httpx.Response(503, request=request)
    cases = [
        (openai.RateLimitError("slow down", response=r429, body=None), "rate_limited", True),
        (openai.InternalServerError("boom", response=r503, body=None), "server_error", True),
        (
            _chained(ConnectionError("Failed to connect to OpenAI API"), openai.APITimeoutError(request)),
            "timeout",
            True,
        ),
        (
            _chained(ConnectionError("Failed to connect"), openai.APIConnectionError(request=request)),
            "connection",
            True,
        ),
        (HookAborted("budget: 9 calls", SOURCE_BUDGET), "budget", False),
        (HookAborted("cancelled: operator", SOURCE_CANCEL), "aborted", False),
        (HookAborted("tool_not_allowed: 'x'", SOURCE_TOOLS), "tool_not_allowed", False),
        (RuntimeError("weird"), "other", False),
    ]
    for exc, kind, retryable in cases:
        err = error_from_exception(exc, settings)
        assert (err.kind, err.retryable) == (kind, retryable), exc
    assert error_from_exception(cases[0][0], settings).retry_after == 7.0


def test_error_messages_never_contain_the_api_key(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-proj-SECRETSECRET1234567890"
    monkeypatch.setenv(settings.llm.api_key_env, secret)
    err = error_from_exception(RuntimeError(f"Incorrect API key provided: {secret}"), settings)
    assert "SECRETSECRET" not in str(err)
    other = error_from_exception(RuntimeError("key sk-abcdefghijklmnop rejected"), settings)
    assert "abcdefghijklmnop" not in str(other)
