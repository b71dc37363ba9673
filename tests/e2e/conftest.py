"""Fixtures for the end-to-end tests: `system(overrides)` -> a System (tests/e2e/harness.py),
stopped for sure at teardown (daemons, their process groups, job process groups, stand-ins)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import System, start_system


@pytest.fixture
def system(tmp_path: Path) -> Iterator[Callable[..., System]]:
    """Factory: `system(overrides, env=..., latency_s=...)` -> a System; closed at teardown."""
    started: list[System] = []

    def make(overrides: dict[str, Any] | None = None, **kwargs: Any) -> System:
        sys_ = start_system(tmp_path / f"system{len(started)}", overrides, **kwargs)
        started.append(sys_)
        return sys_

    try:
        yield make
    finally:
        for sys_ in started:
            sys_.close()
