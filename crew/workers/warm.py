"""Imports the fork server loads once, so each job's child starts with them in memory.

A kickoff lazily imports a few hundred modules (openai resources, httpcore, OpenInference ...).
Importing them here, without running any crew (CrewAI's threads do not survive fork), saves
each child that work. An ImportError only costs speed, never correctness.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")  # before crewai is imported anywhere

#: Modules a first kickoff would otherwise import inside every child.
WARM_MODULES = (
    "crewai",
    "crewai.hooks.contexts",
    "crewai.llms.cache",
    "crewai.skills.tool",
    "openai.resources",
    "openai.pagination",
    "openai.types.chat.completions",
    "httpcore",
    "h11",
    "openinference.instrumentation.crewai",
    "opentelemetry.sdk.trace",
    "opentelemetry.instrumentation",
    "opentelemetry.propagate",
    "opentelemetry.semconv.schemas",
    "packaging.requirements",
    "packaging.tags",
    "wrapt",
    "crewguard.crew.flow.triage",
)

for _name in WARM_MODULES:
    try:
        importlib.import_module(_name)
    except ImportError:
        pass  # only slower children
