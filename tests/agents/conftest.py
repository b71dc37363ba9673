"""The scenario LLM for the agents' tests: real CrewAI over HTTP on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from crewguard.agents import hooks
from crewguard.agents.email import EmailForTriage
from crewguard.llm_sim import ScenarioLLM
from crewguard.settings import Settings, load_settings


@pytest.fixture(scope="session")
def sim() -> Iterator[ScenarioLLM]:
    server = ScenarioLLM(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def sim_settings(sim: ScenarioLLM) -> Callable[..., Settings]:
    """Settings pointing the crew at the scenario LLM, one scenario for every request."""

    def make(scenario: str, **llm: object) -> Settings:
        return load_settings(llm={"base_url": sim.scenario_url(scenario), "timeout_s": 5, **llm})

    return make


@pytest.fixture(autouse=True)
def _cancel_switch_off() -> Iterator[None]:
    hooks.reset_cancel()
    yield
    hooks.reset_cancel()


def email(subject: str, body: str, sender: str = "ann@acme.example") -> EmailForTriage:
    """A distinct email (the simulator counts attempts per email text)."""
    return EmailForTriage(uuid.uuid4().hex, sender, subject, f"{body}\n-- ref {uuid.uuid4().hex[:8]}")
