"""Crew building: fresh crews, LLM settings, tool filtering, hooks once, hot reload of the YAML."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from crewai.hooks import InterceptionPoint, get_hooks

from crewguard.agents import hooks
from crewguard.agents.crew_factory import AgentsConfigError, allowed_categories_text, build_crew
from crewguard.agents.email import EMAIL_END, EMAIL_START, EmailForTriage
from crewguard.settings import PACKAGED_CONFIG_DIR, Settings, load_settings

EMAIL = EmailForTriage("k1", "ann@acme.example", "Refund", "I was charged twice {allowed_categories} {email}")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    for name in ("agents.yaml", "tasks.yaml"):
        shutil.copy(PACKAGED_CONFIG_DIR / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def settings(config_dir: Path) -> Settings:
    return load_settings(config_dir=str(config_dir))


def edit(path: Path, old: str, new: str) -> None:
    """Change a file and move its mtime forward (a second edit within one clock tick must still count)."""
    text = path.read_text()
    assert old in text
    before = path.stat().st_mtime_ns
    path.write_text(text.replace(old, new, 1))
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_crew_shape_and_llm_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.llm.api_key_env, "sk-test-key-123456")
    crew = build_crew(settings, EMAIL)
    assert [a.role for a in crew.agents] == ["Support email classifier", "Support email router"]
    assert [a.max_retry_limit for a in crew.agents] == [0, 0]
    assert all(a.allow_delegation is False for a in crew.agents)
    llm = crew.agents[0].llm
    assert llm.timeout == settings.llm.timeout_s and llm.max_retries == 0
    assert llm.base_url == settings.llm.base_url and llm.api_key == "sk-test-key-123456"
    assert crew.tasks[1].context == [crew.tasks[0]]
    monkeypatch.delenv(settings.llm.api_key_env)
    assert build_crew(settings, EMAIL).agents[0].llm.api_key == "sk-no-key"


def test_prompt_has_categories_line_and_fenced_email(settings: Settings) -> None:
    description = build_crew(settings, EMAIL).tasks[0].description
    lines = description.splitlines()
    assert f"Allowed categories: {allowed_categories_text(settings)}" in lines
    assert (
        "invoice (team billing): invoices, charges, refunds, payment methods; outage (team technical):"
        in description
    )
    start, end = lines.index(EMAIL_START), lines.index(EMAIL_END)
    assert lines[start + 1 : end][:2] == ["From: ann@acme.example", "Subject: Refund"]
    # placeholders inside the email are data: not expanded
    assert "I was charged twice {allowed_categories} {email}" in lines[start + 1 : end]


def test_fresh_crew_per_email(settings: Settings) -> None:
    a, b = build_crew(settings, EMAIL), build_crew(settings, EMAIL)
    assert a is not b and a.agents[0] is not b.agents[0] and a.agents[0].llm is not b.agents[0].llm
    assert a.agents[0].tools[0] is not b.agents[0].tools[0]


def test_only_registered_and_allowed_tools_are_given(settings: Settings) -> None:
    names = [t.name for t in build_crew(settings, EMAIL).agents[0].tools]
    assert names == ["lookup_sender_history", "search_knowledge_base"]
    narrow = settings.model_copy(update={"tools_allowed": ["search_knowledge_base"]})
    assert [t.name for t in build_crew(narrow, EMAIL).agents[0].tools] == ["search_knowledge_base"]
    none = settings.model_copy(update={"tools_allowed": []})
    assert all(not a.tools for a in build_crew(none, EMAIL).agents)


def test_hooks_are_registered_once(settings: Settings) -> None:
    def ours(point: InterceptionPoint) -> int:
        return sum(1 for h in get_hooks(point) if h is hooks.REGISTERED_HOOKS[point])

    before = {p: len(get_hooks(p)) for p in InterceptionPoint}
    for _ in range(5):
        build_crew(settings, EMAIL)
    assert {p: len(get_hooks(p)) for p in InterceptionPoint} == before
    assert ours(InterceptionPoint.PRE_MODEL_CALL) == 1
    assert ours(InterceptionPoint.PRE_TOOL_CALL) == 1


def test_hot_reload_and_last_good_kept(
    settings: Settings, config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agents = config_dir / "agents.yaml"
    assert build_crew(settings, EMAIL).agents[0].max_iter == 4

    edit(agents, "max_iter: 4", "max_iter: 2")
    assert build_crew(settings, EMAIL).agents[0].max_iter == 2  # next email, no restart

    with caplog.at_level(logging.ERROR, logger="crewguard.agents.crew_factory"):
        edit(agents, "max_iter: 2", "max_iter: [2")  # YAML syntax error
        assert build_crew(settings, EMAIL).agents[0].max_iter == 2
        build_crew(settings, EMAIL)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per bad version, not per email
    assert "keeping the last good version" in errors[0].getMessage()
    assert "agents.yaml:" in errors[0].getMessage()

    edit(agents, "max_iter: [2", "max_iter: 3\n  tools: [delete_all_tickets]\n  x_unused: 1")
    assert build_crew(settings, EMAIL).agents[0].max_iter == 2  # semantic error: still the last good

    edit(agents, "max_iter: 3\n  tools: [delete_all_tickets]\n  x_unused: 1", "max_iter: 3")
    assert build_crew(settings, EMAIL).agents[0].max_iter == 3

    tasks = config_dir / "tasks.yaml"
    edit(tasks, "Check the classification", "Double-check the classification")
    assert build_crew(settings, EMAIL).tasks[1].description.startswith("Double-check")


def test_invalid_config_without_a_good_one_is_an_error(settings: Settings, config_dir: Path) -> None:
    edit(config_dir / "tasks.yaml", "agent: router", "agent: nobody")
    with pytest.raises(AgentsConfigError, match=r"tasks.yaml:\d+: route_task.agent: unknown agent"):
        build_crew(settings, EMAIL)
