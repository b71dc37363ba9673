"""The two classifiers: the CrewAI crew (one attempt per call) and the keyword rules from config.

Whatever the LLM answers is validated against the configuration: the category must be configured
and the team must be that category's team, so no email can route itself somewhere new.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from crewguard.agents.email import EmailForTriage

log = logging.getLogger(__name__)

#: Longest reason kept from a classifier (it lands in tickets and the audit log).
MAX_REASON_CHARS = 500
#: Body characters the keyword classifier reads.
MAX_KEYWORD_BODY_CHARS = 20_000
#: Keyword score of a hit in the subject vs. in the body.
SUBJECT_WEIGHT = 2.0
BODY_WEIGHT = 1.0
#: Keyword confidence = min(cap, base + per_point * best + per_margin * margin).
KEYWORD_CONFIDENCE_BASE = 0.4
KEYWORD_CONFIDENCE_PER_POINT = 0.05
KEYWORD_CONFIDENCE_PER_MARGIN = 0.1
KEYWORD_CONFIDENCE_CAP = 0.9

KINDS = (
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "bad_output",
    "out_of_bounds",
    "budget",
    "aborted",
    "tool_not_allowed",
    "other",
)
#: Kinds worth another attempt (transient faults of the LLM service).
RETRYABLE_KINDS = frozenset({"timeout", "connection", "rate_limited", "server_error"})

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.S)
_SECRETISH = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}")


@dataclass(frozen=True)
class Classification:
    """category/team: configured values; confidence in [0, 1]; classifier: "llm" | "keyword" | "human"."""

    category: str
    team: str
    confidence: float
    reason: str
    classifier: str


class LlmClassificationError(Exception):
    """One failed LLM attempt. `kind` is one of KINDS; the message never contains the API key.

    retryable: whether another attempt may succeed (transient LLM-service faults only)
    retry_after: the server's Retry-After in seconds (429), if it sent one
    """

    def __init__(
        self, kind: str, message: str, *, retryable: bool | None = None, retry_after: float | None = None
    ):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.retryable = kind in RETRYABLE_KINDS if retryable is None else retryable
        self.retry_after = retry_after


# --- LLM ------------------------------------------------------------------------------------


def classify_with_llm(
    email: EmailForTriage, settings: Any, *, budget: Any, llm: Any = None
) -> Classification:
    """ONE attempt with a fresh crew (the caller retries); raises LlmClassificationError.

    budget: the run's crewguard.agents.hooks.RunBudget, shared by all attempts of the run
    llm: an LLM instead of the configured one (see build_crew)
    """
    from crewguard.agents.crew_factory import AgentsConfigError, build_crew
    from crewguard.agents.hooks import run_scope

    try:
        crew = build_crew(settings, email, llm=llm)
    except AgentsConfigError as exc:
        raise LlmClassificationError("other", f"agents config unusable: {exc}", retryable=False) from None
    budget.allowed_tools = frozenset(tool.name for agent in crew.agents for tool in agent.tools or [])
    llms = {id(agent.llm): agent.llm for agent in crew.agents}
    with run_scope(budget), _without_hidden_rate_limit_retry():
        try:
            output = crew.kickoff()
        except Exception as exc:
            raise error_from_exception(exc, settings) from None
        finally:
            for model in llms.values():
                budget.add_usage(model)
    if budget.refused_tools:
        raise LlmClassificationError(
            "tool_not_allowed",
            f"the model called {budget.refused_tools[0]!r}, which is not allowed",
            retryable=False,
        )
    tasks_output = getattr(output, "tasks_output", None) or []
    raw = tasks_output[-1].raw if tasks_output else getattr(output, "raw", "")
    return parse_llm_answer(raw, settings)


@contextmanager
def _without_hidden_rate_limit_retry() -> Iterator[None]:
    """Switch off CrewAI 1.15's own 429 retry loop (3 attempts, sleeps up to 8 s, uncounted): retries are ours.

    CrewAI skips that loop when its "already inside a rate-limit retry" context variable is set.
    """
    try:
        from crewai.llms import retry as crewai_retry

        flag = crewai_retry._active_llm_rate_limit_retry
    except (ImportError, AttributeError):  # another CrewAI version: nothing to switch off
        log.warning("cannot switch off CrewAI's internal rate-limit retry; 429s may be retried twice")
        yield
        return
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def parse_llm_answer(raw: Any, settings: Any) -> Classification:
    """Validate the crew's final answer (`output.raw`): JSON {category, team, confidence, reason} within config."""
    data = _json_object(raw)
    category, team = data.get("category"), data.get("team")
    if not isinstance(category, str) or not isinstance(team, str):
        raise LlmClassificationError("bad_output", "category and team must be strings")
    category, team = category.strip(), team.strip()
    if category not in settings.categories:
        raise LlmClassificationError("out_of_bounds", f"category {_short(category)!r} is not configured")
    if settings.teams and team not in settings.teams:
        raise LlmClassificationError("out_of_bounds", f"team {_short(team)!r} is not configured")
    if team != settings.team_of(category):
        raise LlmClassificationError(
            "out_of_bounds",
            f"team {_short(team)!r} does not own category {category!r} ({settings.team_of(category)!r} does)",
        )
    confidence = data.get("confidence")
    if isinstance(confidence, str):
        with suppress(ValueError):
            confidence = float(confidence)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        raise LlmClassificationError(
            "bad_output", f"confidence must be a number in [0, 1], got {_short(str(confidence))!r}"
        )
    reason = data.get("reason", "")
    reason = reason if isinstance(reason, str) else json.dumps(reason)
    return Classification(category, team, float(confidence), reason.strip()[:MAX_REASON_CHARS], "llm")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _json_object(raw: Any) -> dict[str, Any]:
    """The JSON object in an answer: whole text, inside ``` fences, or the outermost {...}."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        raise LlmClassificationError("bad_output", "empty answer")
    text = raw.strip()
    fenced = _FENCE.match(text)
    candidates = [fenced.group(1).strip()] if fenced else [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    raise LlmClassificationError("bad_output", f"answer is not a JSON object: {_short(text)!r}")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def redact(message: str, settings: Any) -> str:
    """`message` without the API key (or anything shaped like one)."""
    import os

    key = os.environ.get(settings.llm.api_key_env)
    if key:
        message = message.replace(key, "***")
    return _SECRETISH.sub(r"\1-***", message)


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_from_exception(exc: BaseException, settings: Any) -> LlmClassificationError:
    """Map what a kickoff raised (CrewAI wraps some openai errors) onto an LlmClassificationError."""
    import openai
    from crewai.hooks import HookAborted

    from crewguard.agents.hooks import SOURCE_BUDGET, SOURCE_CANCEL, SOURCE_TOOLS

    def make(kind: str, e: BaseException, **kw: Any) -> LlmClassificationError:
        return LlmClassificationError(kind, redact(f"{type(e).__name__}: {e}", settings), **kw)

    chain = _chain(exc)
    for e in chain:
        if isinstance(e, HookAborted):
            kind = {SOURCE_BUDGET: "budget", SOURCE_CANCEL: "aborted", SOURCE_TOOLS: "tool_not_allowed"}
            return make(kind.get(e.source, "aborted"), e)
    for e in chain:
        if isinstance(e, openai.RateLimitError):
            return make("rate_limited", e, retry_after=_retry_after(e))
        if isinstance(e, openai.APITimeoutError):
            return make("timeout", e)
        if isinstance(e, openai.APIConnectionError):
            return make("connection", e)
        if isinstance(e, openai.APIStatusError):
            return make("server_error" if e.status_code >= 500 else "other", e)
        if isinstance(e, openai.APIResponseValidationError):
            return make("server_error", e)  # a garbled HTTP response: the service, not the answer
    for e in chain:
        if isinstance(e, TimeoutError):
            return make("timeout", e)
        if isinstance(e, ConnectionError):
            return make("connection", e)
        if isinstance(e, json.JSONDecodeError):
            return make("server_error", e)  # the HTTP body was not JSON: a garbled response, worth a retry
        if isinstance(e, ValueError):  # e.g. pydantic rejecting a tool call as the final answer
            return make("bad_output", e)
    return make("other", exc)


# --- keywords --------------------------------------------------------------------------------


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    words = r"\s+".join(re.escape(w) for w in keyword.lower().split())
    return re.compile(rf"(?<![\w-]){words}(?:s|es)?(?![\w-])", re.I)


_patterns: dict[str, re.Pattern[str]] = {}


def keyword_scores(email: EmailForTriage, settings: Any) -> dict[str, tuple[float, list[str]]]:
    """Per configured category: (score, keywords found); SUBJECT_WEIGHT per keyword in the subject, BODY_WEIGHT in the body."""
    subject, body = email.subject, email.body[:MAX_KEYWORD_BODY_CHARS]
    scores: dict[str, tuple[float, list[str]]] = {}
    for name, category in settings.categories.items():
        score, found = 0.0, []
        for keyword in category.keywords:
            if not keyword.strip():
                continue
            pattern = _patterns.get(keyword) or _patterns.setdefault(keyword, _keyword_pattern(keyword))
            hit = 0.0
            if pattern.search(subject):
                hit += SUBJECT_WEIGHT
            if pattern.search(body):
                hit += BODY_WEIGHT
            if hit:
                score += hit
                found.append(keyword)
        scores[name] = (score, found)
    return scores


def classify_with_keywords(email: EmailForTriage, settings: Any) -> Classification | None:
    """The best-scoring category, or None when it is not clearly ahead (settings.keyword min_score/min_margin)."""
    scores = keyword_scores(email, settings)
    if not scores:
        return None
    ranked = sorted(scores.items(), key=lambda item: item[1][0], reverse=True)
    best_name, (best, found) = ranked[0]
    margin = best - (ranked[1][1][0] if len(ranked) > 1 else 0.0)
    if best < settings.keyword.min_score or margin < settings.keyword.min_margin:
        return None
    team = settings.team_of(best_name)
    if team is None:
        return None
    confidence = min(
        KEYWORD_CONFIDENCE_CAP,
        KEYWORD_CONFIDENCE_BASE
        + KEYWORD_CONFIDENCE_PER_POINT * best
        + KEYWORD_CONFIDENCE_PER_MARGIN * margin,
    )
    reason = f"keywords: {', '.join(found[:5])} (score {best:g}, runner-up {best - margin:g})"
    return Classification(best_name, team, round(confidence, 2), reason, "keyword")
