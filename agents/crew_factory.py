"""A fresh CrewAI crew per email, built from config/agents.yaml and tasks.yaml.

Fresh per email because an Agent's retry counter is never reset (research/crewai.md §5.4);
built directly from the YAML (no @CrewBase, whose hook methods leak, §7). The parsed YAML is
cached by file mtime: an edit takes effect for the next email, and an invalid edit keeps the
last good configuration with the problems logged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crewai import LLM, Agent, Crew, Process, Task

from crewguard.agents import hooks as _hooks  # noqa: F401  (registers the run guards once, at import)
from crewguard.agents.config_check import AGENTS_FILE, TASKS_FILE, load_doc, validate_crew_config
from crewguard.agents.email import EmailForTriage, render_for_prompt
from crewguard.agents.tools import tools_for
from crewguard.yamlconf import YamlError

log = logging.getLogger(__name__)

#: api_key when the configured variable is unset: the openai SDK refuses an empty key, local servers ignore it.
PLACEHOLDER_API_KEY = "sk-no-key"
#: Agent settings when agents.yaml does not give them.
DEFAULT_MAX_ITER = 4
DEFAULT_MAX_RETRY_LIMIT = 0  # retries are ours (crewguard.retry), counted and traced

_PLACEHOLDER = re.compile(r"\{(email|allowed_categories)\}")


class AgentsConfigError(Exception):
    """agents.yaml / tasks.yaml are unusable and no earlier good version is loaded."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CrewConfig:
    """A validated agents/tasks pair; `version` is the (mtime_ns, size) of both files."""

    agents: dict[str, dict[str, Any]]
    tasks: dict[str, dict[str, Any]]
    version: tuple[int, ...]


@dataclass
class _CacheEntry:
    good: CrewConfig | None = None
    rejected_version: tuple[int, ...] | None = None


_cache: dict[Path, _CacheEntry] = {}
_cache_lock = threading.Lock()


def _version(folder: Path) -> tuple[int, ...]:
    parts: list[int] = []
    for file in (AGENTS_FILE, TASKS_FILE):
        try:
            st = (folder / file).stat()
            parts += [st.st_mtime_ns, st.st_size, st.st_ino]
        except OSError:
            parts += [-1, -1, -1]
    return tuple(parts)


def load_crew_config(folder: Path) -> CrewConfig:
    """The current agents/tasks config of `folder`: re-read when a file changed, last good on error."""
    folder = Path(folder).resolve()
    version = _version(folder)
    with _cache_lock:
        entry = _cache.setdefault(folder, _CacheEntry())
        if entry.good is not None and entry.good.version == version:
            return entry.good
        if entry.rejected_version == version and entry.good is not None:
            return entry.good
        try:
            agents, tasks = load_doc(folder / AGENTS_FILE), load_doc(folder / TASKS_FILE)
            problems = validate_crew_config(agents, tasks)
        except YamlError as exc:
            problems = [str(exc)]
        if not problems:
            entry.good = CrewConfig(dict(agents.data), dict(tasks.data), version)
            entry.rejected_version = None
            return entry.good
        if entry.good is None:
            raise AgentsConfigError(problems)
        if entry.rejected_version != version:
            log.error(
                "agents config in %s is invalid; keeping the last good version:\n%s",
                folder,
                "\n".join(problems),
            )
            entry.rejected_version = version
        return entry.good


def allowed_categories_text(settings: Any) -> str:
    """`<name> (team <team>): <description>; ...` for the `Allowed categories:` line of the tasks."""
    parts = []
    for name, cat in settings.categories.items():
        description = " ".join(cat.description.replace(";", ",").split())
        parts.append(
            f"{name} (team {cat.team}): {description}" if description else f"{name} (team {cat.team})"
        )
    return "; ".join(parts)


def render_template(template: str, values: dict[str, str]) -> str:
    """Fill {email} / {allowed_categories} in one pass: text inside a value is never expanded again."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def make_llm(settings: Any) -> LLM:
    """The configured LLM: explicit timeout, SDK retries off (crewguard retries), key from the environment."""
    cfg = settings.llm
    return LLM(
        model=cfg.model,
        base_url=cfg.base_url,
        api_key=os.environ.get(cfg.api_key_env) or PLACEHOLDER_API_KEY,
        timeout=cfg.timeout_s,
        max_retries=0,
        temperature=cfg.temperature,
        stream=cfg.stream,
    )


def build_crew(settings: Any, email: EmailForTriage, *, llm: Any = None) -> Crew:
    """A new crew for `email`, prompts already filled: kick it off with no inputs.

    settings: crewguard Settings (llm, categories, tools_allowed, agents_config_dir)
    email: the email to triage; rendered as untrusted data between the EMAIL START/END lines
    llm: an LLM to use instead of the configured one (tests, other providers)
    """
    config = load_crew_config(settings.agents_config_dir)
    values = {"email": render_for_prompt(email), "allowed_categories": allowed_categories_text(settings)}
    llm = llm if llm is not None else make_llm(settings)
    agents: dict[str, Agent] = {}
    for name, spec in config.agents.items():
        agents[name] = Agent(
            role=render_template(spec["role"].strip(), values),
            goal=render_template(spec["goal"].strip(), values),
            backstory=render_template(spec["backstory"].strip(), values),
            llm=llm,
            tools=tools_for(spec.get("tools") or [], settings.tools_allowed),
            max_iter=spec.get("max_iter", DEFAULT_MAX_ITER),
            max_retry_limit=spec.get("max_retry_limit", DEFAULT_MAX_RETRY_LIMIT),
            allow_delegation=False,
            verbose=bool(spec.get("verbose", False)),
        )
    tasks: dict[str, Task] = {}
    for name, spec in config.tasks.items():
        tasks[name] = Task(
            name=name,
            description=render_template(spec["description"].strip(), values),
            expected_output=render_template(spec["expected_output"].strip(), values),
            agent=agents[spec["agent"]],
            context=[tasks[ref] for ref in spec.get("context") or []] or None,
        )
    return Crew(
        agents=list(agents.values()),
        tasks=list(tasks.values()),
        process=Process.sequential,
        verbose=False,
        memory=False,
        cache=False,
    )
