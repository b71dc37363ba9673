"""Shared fixtures: ledgers on SQLite and PostgreSQL, and the services policy.

Tests that need a service skip with a reason when it is missing, except when
CREWGUARD_REQUIRE_SERVICES=1 (CI), where a missing service fails the test.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("CREWAI_DISABLE_VERSION_CHECK", "true")

PG_ADMIN_URL = os.environ.get("CREWGUARD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("CREWGUARD_REQUIRE_SERVICES") == "1"


def need_service(name: str, host: str, port: int) -> None:
    """Skip (or fail under CREWGUARD_REQUIRE_SERVICES=1) when host:port does not answer."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} not reachable on {host}:{port}: {exc}"
        if REQUIRE_SERVICES:
            pytest.fail(message + " (CREWGUARD_REQUIRE_SERVICES=1)")
        pytest.skip(message)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    from crewguard.crew.ledger.db import scratch_schema

    with scratch_schema(PG_ADMIN_URL) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same contract test runs on both engines."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


#: Test folders that must run before any in-process CrewAI kickoff: OpenInference's CrewAI
#: instrumentation only sees LLM calls when it is installed before the process's first kickoff
#: (as in production, where each worker child sets up tracing first).
RUN_FIRST = ("tests/tracing/",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def first(item: pytest.Item) -> int:
        path = item.nodeid.replace("\\", "/")
        return 0 if any(path.startswith(prefix) for prefix in RUN_FIRST) else 1

    items.sort(key=first)  # stable: the order inside each group is kept
