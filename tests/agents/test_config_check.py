"""`check_agents_config` finds each problem and names file, line and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crewguard.agents.config_check import check_agents_config
from crewguard.settings import PACKAGED_CONFIG_DIR, Settings, load_settings

AGENTS = """\
classifier:
  role: Support email classifier
  goal: classify
  backstory: you triage
  tools:
    - search_knowledge_base
  max_iter: 4
router:
  role: Support email router
  goal: route
  backstory: you route
"""
TASK_DESCRIPTION = """\
    Allowed categories: {allowed_categories}
    --- EMAIL START ---
    {email}
    --- EMAIL END ---
"""
TASKS = f"""\
classify_task:
  description: |
{TASK_DESCRIPTION}  expected_output: JSON
  agent: classifier
route_task:
  description: |
{TASK_DESCRIPTION}  expected_output: JSON
  agent: router
  context: [classify_task]
"""


def configure(tmp_path: Path, agents: str = AGENTS, tasks: str = TASKS) -> Settings:
    (tmp_path / "agents.yaml").write_text(agents)
    (tmp_path / "tasks.yaml").write_text(tasks)
    return load_settings(config_dir=str(tmp_path))


def test_packaged_config_is_clean() -> None:
    assert check_agents_config(load_settings(config_dir=str(PACKAGED_CONFIG_DIR))) == []


def test_minimal_config_is_clean(tmp_path: Path) -> None:
    assert check_agents_config(configure(tmp_path)) == []


def one_problem(settings: Settings) -> str:
    problems = check_agents_config(settings)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  goal: classify\n", "", "agents.yaml:1: classifier.goal: required"),
        ("  backstory: you route\n", "", "agents.yaml:8: router.backstory: required"),
        (
            "  max_iter: 4\n",
            "  max_iter: 0\n",
            "agents.yaml:7: classifier.max_iter: must be a positive integer",
        ),
        (
            "  max_iter: 4\n",
            "  max_iter: four\n",
            "agents.yaml:7: classifier.max_iter: must be a positive integer",
        ),
        (
            "    - search_knowledge_base\n",
            "    - delete_all_tickets\n",
            "agents.yaml:6: classifier.tools.0: unknown tool",
        ),
        ("  max_iter: 4\n", "  max_iter: 4\n  llm: gpt-4\n", "agents.yaml:8: classifier.llm: unknown key"),
        (
            "  max_iter: 4\n",
            "  max_iter: 4\n  allow_delegation: true\n",
            "agents.yaml:8: classifier.allow_delegation: must be false",
        ),
        (
            "  goal: route\n",
            "  goal: route to {team}\n",
            "agents.yaml:10: router.goal: unknown placeholder {team}",
        ),
        ("  tools:\n", "  tools: [\n", "agents.yaml:"),  # syntax error
    ],
)
def test_agents_problems(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in AGENTS
    problem = one_problem(configure(tmp_path, agents=AGENTS.replace(old, new, 1)))
    assert problem.startswith(str(tmp_path / "agents.yaml") + ":")
    assert expected in problem, problem


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    problem = one_problem(configure(tmp_path, agents=AGENTS.replace("  max_iter: 4\n", "  max_iter: [4\n")))
    assert problem.startswith(f"{tmp_path / 'agents.yaml'}:8: (syntax)"), problem


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  agent: router\n", "  agent: ceo\n", "tasks.yaml:16: route_task.agent: unknown agent 'ceo'"),
        (
            "  expected_output: JSON\n  agent: classifier\n",
            "  agent: classifier\n",
            "tasks.yaml:1: classify_task.expected_output: required",
        ),
        (
            "  context: [classify_task]\n",
            "  context: [triage_task]\n",
            "tasks.yaml:17: route_task.context.0: 'triage_task' is not a task",
        ),
        (
            "    {email}\n",
            "    the email\n",
            "tasks.yaml:2: classify_task.description: missing {email} placeholder",
        ),
        (
            "  agent: classifier\n",
            "  agent: classifier\n  guardrail: x\n",
            "tasks.yaml:9: classify_task.guardrail: unknown key",
        ),
        (
            "    --- EMAIL START ---\n",
            "",
            "tasks.yaml:2: classify_task.description: {email} must sit between",
        ),
    ],
)
def test_tasks_problems(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in TASKS
    problem = one_problem(configure(tmp_path, tasks=TASKS.replace(old, new, 1)))
    assert expected in problem, problem
    assert problem.startswith(str(tmp_path / "tasks.yaml") + ":")


def test_tool_outside_tools_allowed(tmp_path: Path) -> None:
    settings = configure(tmp_path).model_copy(update={"tools_allowed": ["lookup_sender_history"]})
    problem = one_problem(settings)
    assert (
        "agents.yaml:6: classifier.tools.0: tool 'search_knowledge_base' is not in tools_allowed" in problem
    )


def test_missing_file(tmp_path: Path) -> None:
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    (tmp_path / "agents.yaml").write_text(AGENTS)
    problem = one_problem(load_settings(config_dir=str(tmp_path)))
    assert "tasks.yaml:0: cannot read" in problem
