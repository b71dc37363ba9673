"""The loop detector's near-repeat rule (supervisor.detectors.loop.near_repeat_threshold), off by default."""

from __future__ import annotations

import dataclasses
import json

from crewguard.supervisor.detectors.loop import LoopDetector
from crewguard.supervisor.model import Snapshot
from crewguard.supervisor.sources.base import shape_key
from tests.supervisor.sv_helpers import T0, make_settings, run, tool


def calls(queries: list[str]) -> Snapshot:
    obs = [
        dataclasses.replace(
            tool("r1", "search_knowledge_base", {"query": q}, T0 + i),
            args_shape=shape_key(json.dumps({"query": q})),
        )
        for i, q in enumerate(queries)
    ]
    return Snapshot(now=T0 + 10, runs={"r1": run("r1")}, observations={"r1": obs})


def detector(threshold: int) -> LoopDetector:
    settings = make_settings(supervisor={"detectors": {"loop": {"near_repeat_threshold": threshold}}})
    return LoopDetector(settings.supervisor.detectors.loop, settings.budgets)


def test_arguments_differing_only_in_numbers_are_a_loop_when_enabled() -> None:
    [f] = detector(3).detect(calls(["csv import stuck #1", "csv import stuck #2", "csv import stuck #3"]))
    assert (f.kind, f.action, f.evidence["pattern"], f.evidence["count"]) == (
        "loop",
        "kill",
        "near_repeat",
        3,
    )


def test_near_repeats_below_threshold_or_disabled_are_left_alone() -> None:
    assert detector(3).detect(calls(["csv import stuck #1", "csv import stuck #2"])) == []
    assert make_settings().supervisor.detectors.loop.near_repeat_threshold == 0
    assert detector(0).detect(calls([f"csv import stuck #{i}" for i in range(6)])) == []


def test_refined_queries_and_numeric_arguments_are_not_near_repeats() -> None:
    assert detector(3).detect(calls(["refund", "refund policy", "refund policy annual plan"])) == []
    assert shape_key({"page": 1}) != shape_key({"page": 2})  # numbers as values stay distinct
    assert shape_key('{"q":"order 1001"}') == shape_key('{"q":"order 1002"}')
