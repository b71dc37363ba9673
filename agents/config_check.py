"""Validation of config/agents.yaml and config/tasks.yaml, with `file:line: field: message` problems.

`check_agents_config(settings)` is what `crewguard config check` reports; `validate_crew_config`
is the settings-independent part that the crew factory also applies before accepting an edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crewguard.agents.email import EMAIL_END, EMAIL_START
from crewguard.agents.tools import TOOL_REGISTRY
from crewguard.yamlconf import YamlError, load_yaml_with_lines

AGENTS_FILE = "agents.yaml"
TASKS_FILE = "tasks.yaml"
#: The placeholders crewguard fills per email; any other {name} would make CrewAI fail at kickoff.
PLACEHOLDERS = ("email", "allowed_categories")
#: Placeholders every task description must contain.
REQUIRED_TASK_PLACEHOLDERS = ("email", "allowed_categories")
REQUIRED_AGENT_KEYS = ("role", "goal", "backstory")
REQUIRED_TASK_KEYS = ("description", "expected_output", "agent")
#: Agent keys crewguard passes to crewai.Agent (tools are resolved through the registry).
AGENT_KEYS = frozenset(
    {*REQUIRED_AGENT_KEYS, "tools", "max_iter", "max_retry_limit", "allow_delegation", "verbose"}
)
TASK_KEYS = frozenset({*REQUIRED_TASK_KEYS, "context"})

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class YamlDoc:
    path: Path
    data: Any
    lines: dict[tuple[str, ...], int]

    def line(self, *key: str) -> int:
        """The line of `key`, or of its nearest present parent, or 1."""
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return 1

    def problem(self, key: tuple[str, ...], message: str) -> str:
        field = ".".join(key) or "(top level)"
        return f"{self.path}:{self.line(*key)}: {field}: {message}"


def load_doc(path: Path) -> YamlDoc:
    """Parse one YAML file keeping key lines; raises YamlError (already `file:line: ...`)."""
    data, lines = load_yaml_with_lines(path)
    return YamlDoc(path, data, lines)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(doc: YamlDoc, key: tuple[str, ...], value: Any) -> list[str]:
    if not isinstance(value, str) or not value.strip():
        return [doc.problem(key, "must be a non-empty string")]
    unknown = sorted(set(_PLACEHOLDER.findall(value)) - set(PLACEHOLDERS))
    if unknown:
        known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        return [doc.problem(key, f"unknown placeholder {{{unknown[0]}}} (known: {known})")]
    return []


def _check_agents(doc: YamlDoc, tools_allowed: list[str] | None) -> list[str]:
    if not isinstance(doc.data, dict) or not doc.data:
        return [doc.problem((), "expected a mapping of agent name -> agent settings")]
    problems: list[str] = []
    for name, agent in doc.data.items():
        name = str(name)
        if not isinstance(agent, dict):
            problems.append(doc.problem((name,), "expected a mapping (role, goal, backstory, ...)"))
            continue
        for key in REQUIRED_AGENT_KEYS:
            if key not in agent:
                problems.append(doc.problem((name, key), "required"))
            else:
                problems += _check_text(doc, (name, key), agent[key])
        for key in agent:
            if str(key) not in AGENT_KEYS:
                hint = " (the LLM is configured in crewguard.yaml)" if key == "llm" else ""
                problems.append(
                    doc.problem(
                        (name, str(key)), f"unknown key; allowed: {', '.join(sorted(AGENT_KEYS))}{hint}"
                    )
                )
        if "max_iter" in agent and not (_is_int(agent["max_iter"]) and agent["max_iter"] > 0):
            problems.append(
                doc.problem((name, "max_iter"), f"must be a positive integer, got {agent['max_iter']!r}")
            )
        if "max_retry_limit" in agent and not (
            _is_int(agent["max_retry_limit"]) and agent["max_retry_limit"] >= 0
        ):
            problems.append(
                doc.problem(
                    (name, "max_retry_limit"), f"must be an integer >= 0, got {agent['max_retry_limit']!r}"
                )
            )
        for key in ("allow_delegation", "verbose"):
            if key in agent and not isinstance(agent[key], bool):
                problems.append(doc.problem((name, key), f"must be true or false, got {agent[key]!r}"))
        if agent.get("allow_delegation") is True:
            problems.append(
                doc.problem(
                    (name, "allow_delegation"),
                    "must be false: delegation tools are outside the tool allowlist",
                )
            )
        problems += _check_tools(doc, name, agent.get("tools", []), tools_allowed)
    return problems


def _check_tools(doc: YamlDoc, agent: str, tools: Any, tools_allowed: list[str] | None) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        return [doc.problem((agent, "tools"), "must be a list of tool names")]
    problems = []
    for i, tool in enumerate(tools):
        key = (agent, "tools", str(i))
        if not isinstance(tool, str) or tool not in TOOL_REGISTRY:
            problems.append(
                doc.problem(key, f"unknown tool {tool!r} (known: {', '.join(sorted(TOOL_REGISTRY))})")
            )
        elif tools_allowed is not None and tool not in tools_allowed:
            problems.append(doc.problem(key, f"tool {tool!r} is not in tools_allowed (crewguard.yaml)"))
    return problems


def _check_email_fence(doc: YamlDoc, key: tuple[str, ...], description: str) -> list[str]:
    lines = [line.strip() for line in description.splitlines()]
    try:
        at = lines.index("{email}")
    except ValueError:
        return [doc.problem(key, "{email} must be alone on its line, between the EMAIL START and END lines")]
    if at == 0 or lines[at - 1] != EMAIL_START or at + 1 >= len(lines) or lines[at + 1] != EMAIL_END:
        return [
            doc.problem(key, f"{{email}} must sit between a {EMAIL_START!r} line and a {EMAIL_END!r} line")
        ]
    return []


def _check_tasks(doc: YamlDoc, agent_names: set[str]) -> list[str]:
    if not isinstance(doc.data, dict) or not doc.data:
        return [doc.problem((), "expected a mapping of task name -> task settings")]
    problems: list[str] = []
    seen: list[str] = []
    for name, task in doc.data.items():
        name = str(name)
        if not isinstance(task, dict):
            problems.append(
                doc.problem((name,), "expected a mapping (description, expected_output, agent, ...)")
            )
            continue
        for key in REQUIRED_TASK_KEYS:
            if key not in task:
                problems.append(doc.problem((name, key), "required"))
        for key in ("description", "expected_output"):
            if key in task:
                problems += _check_text(doc, (name, key), task[key])
        description = task.get("description")
        if isinstance(description, str):
            for placeholder in REQUIRED_TASK_PLACEHOLDERS:
                if "{" + placeholder + "}" not in description:
                    problems.append(
                        doc.problem((name, "description"), f"missing {{{placeholder}}} placeholder")
                    )
            if "{email}" in description:
                problems += _check_email_fence(doc, (name, "description"), description)
        if "agent" in task and task["agent"] not in agent_names:
            problems.append(
                doc.problem(
                    (name, "agent"),
                    f"unknown agent {task['agent']!r} (agents.yaml has: {', '.join(sorted(agent_names))})",
                )
            )
        for key in task:
            if str(key) not in TASK_KEYS:
                problems.append(
                    doc.problem((name, str(key)), f"unknown key; allowed: {', '.join(sorted(TASK_KEYS))}")
                )
        context = task.get("context", [])
        if context is not None and not isinstance(context, list):
            problems.append(doc.problem((name, "context"), "must be a list of earlier task names"))
        else:
            for i, ref in enumerate(context or []):
                if ref not in seen:
                    problems.append(
                        doc.problem(
                            (name, "context", str(i)), f"{ref!r} is not a task defined above this one"
                        )
                    )
        seen.append(name)
    return problems


def validate_crew_config(
    agents: YamlDoc, tasks: YamlDoc, tools_allowed: list[str] | None = None
) -> list[str]:
    """Problems in a parsed agents/tasks pair; `tools_allowed=None` skips the allowlist check."""
    problems = _check_agents(agents, tools_allowed)
    names = {str(n) for n in agents.data} if isinstance(agents.data, dict) else set()
    return problems + _check_tasks(tasks, names)


def check_agents_config(settings: Any) -> list[str]:
    """Every problem in <agents_config_dir>/agents.yaml and tasks.yaml, as `file:line: field: message`."""
    folder = Path(settings.agents_config_dir)
    docs: list[YamlDoc] = []
    problems: list[str] = []
    for file in (AGENTS_FILE, TASKS_FILE):
        try:
            docs.append(load_doc(folder / file))
        except YamlError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    return validate_crew_config(docs[0], docs[1], list(settings.tools_allowed))
