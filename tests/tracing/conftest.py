"""Fixtures for tracing tests: the Langfuse stand-in, the scenario LLM, a ledger with a claimed run,
and a small real CrewAI crew (one agent, one tool) pointed at the scenario LLM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine

from crewguard.crew.ledger import db, jobs
from crewguard.llm_sim import ScenarioLLM
from crewguard.settings import Settings
from crewguard.standins.langfuse import LangfuseStandin

#: The email the test crew routes: contact details to mask, body text to remove.
SENDER = "alice.customer@example.com"
PHONE = "+1 415 555 1234"
BODY_TEXT = "I was charged twice for my subscription"
EMAIL_TEXT = f"Route this email.\nFrom: {SENDER}\nSubject: refund\n\n{BODY_TEXT}, call me at {PHONE}."


@dataclass
class LedgerRun:
    engine: Engine
    claim: jobs.Claim


@pytest.fixture
def scenario_llm() -> Iterator[ScenarioLLM]:
    with ScenarioLLM(port=0) as sim:
        yield sim


@pytest.fixture
def langfuse_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[LangfuseStandin]:
    with LangfuseStandin(port=0) as standin:
        monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", standin.public_key)
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", standin.secret_key)
        monkeypatch.setenv("LANGFUSE_BASE_URL", standin.base_url)
        yield standin


def make_run(url: str) -> LedgerRun:
    """A ledger with one queued email claimed: a real `runs` row to account into."""
    engine = db.open_engine(url)
    with db.write(engine) as conn:
        jobs.enqueue_email(
            conn, key="e" * 64, raw=b"x", source="file", source_ref=None, message_id="<m@x>",
            subject="refund", sender=SENDER, parse_error=None, max_attempts=3,
        )  # fmt: skip
    claim = jobs.claim_next_job(engine, "test-worker", lease_s=60)
    assert claim is not None
    return LedgerRun(engine, claim)


@pytest.fixture
def ledger_run(sqlite_url: str) -> Iterator[LedgerRun]:
    run = make_run(sqlite_url)
    yield run
    run.engine.dispose()


def tracing_settings(*, mask: str = "contacts", langfuse: bool = True, local_feed: bool = True) -> Settings:
    return Settings(
        tracing={
            "local_feed": local_feed,
            "mask": mask,
            "langfuse": {"enabled": langfuse, "flush_interval_s": 0.2, "timeout_s": 1.0},
            "prices": {"openai/gpt-4o-mini": {"prompt_per_1k": 0.15, "completion_per_1k": 0.6}},
        }
    )


def kickoff(base_url: str, email_text: str = EMAIL_TEXT) -> Any:
    """A fresh one-agent crew with a sender-lookup tool, run once against `base_url`."""
    os.environ.setdefault("OPENAI_API_KEY", "sk-test")
    from crewai import LLM, Agent, Crew, Task
    from crewai.tools import tool

    @tool("lookup_sender_history")
    def lookup_sender_history(sender: str) -> str:
        """Past tickets of a sender."""
        return f"no earlier tickets from {sender}"

    llm = LLM(model="openai/gpt-4o-mini", base_url=base_url, api_key="sk-test", timeout=10, max_retries=0)
    agent = Agent(
        role="router", goal="route email", backstory="support desk", llm=llm, tools=[lookup_sender_history]
    )
    task = Task(description=email_text, expected_output="JSON", agent=agent, name="route")
    return Crew(agents=[agent], tasks=[task]).kickoff()
