"""Each detector: what it must catch and what it must leave alone (pure: hand-built snapshots)."""

from __future__ import annotations

import dataclasses

from crewguard.supervisor.detectors.error_burst import ErrorBurstDetector
from crewguard.supervisor.detectors.loop import LoopDetector, find_cycle
from crewguard.supervisor.detectors.queue import QueueDetector
from crewguard.supervisor.detectors.stall import StallDetector
from crewguard.supervisor.detectors.token_spike import TokenSpikeDetector
from crewguard.supervisor.model import FleetStats, RunningJob, Snapshot
from tests.supervisor.sv_helpers import T0, llm, make_settings, run, tool

SETTINGS = make_settings()
DET = SETTINGS.supervisor.detectors


def snap(obs: list, *, now: float = T0 + 10, runs: dict | None = None, **kw) -> Snapshot:
    by_run: dict = {}
    for o in obs:
        by_run.setdefault(o.run_id, []).append(o)
    for v in by_run.values():
        v.sort(key=lambda o: (o.started_at, o.seq))
    return Snapshot(now=now, runs=runs or {"r1": run("r1")}, observations=by_run, **kw)


def loop_detector():
    return LoopDetector(DET.loop, SETTINGS.budgets)


# --- loop ------------------------------------------------------------------------------------------
def test_same_tool_same_args_four_times_is_a_loop_at_threshold_3():
    obs = [tool("r1", "search_knowledge_base", {"q": "refund"}, T0 + i) for i in range(4)]
    [f] = loop_detector().detect(snap(obs))
    assert (f.kind, f.action, f.run_id, f.dedupe_key) == ("loop", "kill", "r1", "loop:r1")
    assert f.evidence["count"] == 4 and f.evidence["pattern"] == "repeat"


def test_two_repeats_are_below_threshold():
    obs = [tool("r1", "search_knowledge_base", {"q": "refund"}, T0 + i) for i in range(2)]
    assert loop_detector().detect(snap(obs)) == []


def test_same_tool_with_different_args_is_legitimate_work():
    obs = [tool("r1", "search_knowledge_base", {"q": f"refund {i}"}, T0 + i) for i in range(6)]
    obs += [llm("r1", T0 + 10 + i) for i in range(3)]
    assert loop_detector().detect(snap(obs)) == []


def test_a_b_a_b_cycle_is_a_loop():
    a, b = ("lookup_sender_history", {"sender": "x"}), ("search_knowledge_base", {"q": "y"})
    calls = [a, b, a, b]
    obs = [tool("r1", n, args, T0 + i) for i, (n, args) in enumerate(calls)]
    obs += [llm("r1", T0 + i + 0.5) for i in range(4)]  # LLM calls in between do not hide the cycle
    [f] = loop_detector().detect(snap(obs))
    assert f.kind == "loop" and f.evidence["pattern"] == "cycle" and f.evidence["period"] == 2


def test_a_b_c_cycle_and_non_cycles():
    assert find_cycle(list("ABCABC"), 2)[0] == list("ABC")
    assert find_cycle(list("ABCDEF"), 2) is None
    assert find_cycle(list("ABA"), 2) is None
    assert find_cycle(list("AAAA"), 2) is None  # a plain repeat, not a cycle


def test_same_prompt_repeated_is_a_loop():
    obs = [llm("r1", T0 + i, prompt="same conversation") for i in range(3)]
    [f] = loop_detector().detect(snap(obs))
    assert f.kind == "loop" and f.evidence["what"] == "prompt"


def test_too_many_llm_calls_is_a_budget_kill():
    obs = [llm("r1", T0 + i) for i in range(SETTINGS.budgets.max_llm_calls + 1)]
    [f] = loop_detector().detect(snap(obs))
    assert (f.kind, f.action, f.evidence["limit"]) == ("budget", "kill", "max_llm_calls")
    ok = [llm("r1", T0 + i) for i in range(SETTINGS.budgets.max_llm_calls)]
    assert loop_detector().detect(snap(ok)) == []


# --- token spike ------------------------------------------------------------------------------------
def spike_detector():
    return TokenSpikeDetector(DET.token_spike, SETTINGS.budgets, SETTINGS.tracing.prices)


def test_single_call_far_above_the_runs_own_baseline_pages():
    obs = [llm("r1", T0 + i, tokens=900 + 50 * i) for i in range(4)] + [llm("r1", T0 + 5, tokens=20_000)]
    found = spike_detector().detect(snap(obs))
    [f] = [f for f in found if f.kind == "token_spike"]
    assert f.action == "page" and f.evidence["tokens"] == 20_000 and f.evidence["baseline"] == "run"
    assert not [f for f in found if f.kind == "budget"]


def test_spike_over_budget_is_killed():
    obs = [llm("r1", T0 + i, tokens=1000) for i in range(3)] + [llm("r1", T0 + 5, tokens=40_000)]
    found = {f.kind: f for f in spike_detector().detect(snap(obs))}
    assert found["budget"].action == "kill" and found["budget"].evidence["limit"] == "max_tokens"
    assert found["token_spike"].action == "kill"


def test_growing_context_and_small_calls_are_not_spikes():
    growing = [llm("r1", T0 + i, tokens=1000 * (i + 1)) for i in range(6)]  # 1k..6k: normal growth
    assert spike_detector().detect(snap(growing)) == []
    small = [llm("r1", T0 + i, tokens=300) for i in range(3)] + [llm("r1", T0 + 4, tokens=3000)]
    assert spike_detector().detect(snap(small)) == []  # 10x but under min_call_tokens


def test_first_call_spike_measured_against_the_fleet():
    fleet = FleetStats()
    fleet.observe({"old": [llm("old", T0 - 100 + i, tokens=1000 + 10 * i) for i in range(20)]})
    found = spike_detector().detect(snap([llm("r1", T0, tokens=15_000)], fleet=fleet))
    [f] = found
    assert f.kind == "token_spike" and f.evidence["baseline"] == "fleet"
    assert spike_detector().detect(snap([llm("r1", T0, tokens=1500)], fleet=fleet)) == []


def test_an_outlier_does_not_move_the_robust_baseline():
    # Earlier spikes in the baseline do not hide a later one (a mean would be dragged up).
    obs = [llm("r1", T0 + i, tokens=t) for i, t in enumerate([1000, 1100, 25_000, 1050, 950])]
    obs.append(llm("r1", T0 + 10, tokens=24_000))
    [f] = [f for f in spike_detector().detect(snap(obs)) if f.kind == "token_spike"]
    assert f.evidence["tokens"] == 24_000 and f.evidence["baseline"] == "run"


def test_fleet_token_rate_far_above_its_baseline():
    now = T0 + 3600
    fleet = FleetStats()
    history = [llm(f"h{m}", now - 60 * m - 30, tokens=10_000) for m in range(1, 11)]  # 10k/min for 10 min
    burst = [llm(f"b{i}", now - 30, tokens=20_000) for i in range(5)]  # 100k in the last minute
    fleet.observe({"h": history + burst})
    [f] = spike_detector().detect(Snapshot(now=now - 0.5 + 1.0, fleet=fleet))
    assert f.dedupe_key == "token_spike:fleet" and f.action == "page"
    calm = FleetStats()
    calm.observe({"h": history + [llm("c", now - 30, tokens=12_000)]})
    assert spike_detector().detect(Snapshot(now=now + 0.5, fleet=calm)) == []


# --- stall ------------------------------------------------------------------------------------------
def stall_detector():
    return StallDetector(DET.stall, SETTINGS.budgets)


def test_stall_by_no_progress():
    r = run("r1", started_at=T0)
    obs = [llm("r1", T0 + 1)]
    assert stall_detector().detect(snap(obs, now=T0 + 30, runs={"r1": r})) == []
    [f] = stall_detector().detect(snap(obs, now=T0 + 2 + DET.stall.no_progress_s + 1, runs={"r1": r}))
    assert (f.kind, f.action, f.evidence["reason"]) == ("stall", "kill", "no_progress")


def test_stall_by_call_in_flight():
    r = run("r1", started_at=T0)
    obs = [llm("r1", T0 + 1), tool("r1", "search_knowledge_base", {"q": 1}, T0 + 3)]
    obs[-1].ended_at = None  # still running
    now = T0 + 3 + DET.stall.call_s + 1
    [f] = stall_detector().detect(snap(obs, now=now, runs={"r1": r}))
    assert f.evidence["reason"] == "call_in_flight" and f.evidence["span_id"] == obs[-1].span_id
    # The same call 10 s in is fine, and progress elsewhere does not count while a call hangs.
    assert stall_detector().detect(snap(obs, now=T0 + 13, runs={"r1": r})) == []


def test_stall_by_dead_owner_heartbeat_or_expired_lease():
    job = RunningJob(
        job_id=7,
        email_key="k" * 64,
        run_id="r7",
        lease_owner="h:9",
        lease_expires_at=T0 + 1000,
        host="h",
        pid=1,
        pgid=1,
    )
    now = T0 + 100
    alive = {"crew:h:9": now - 1}
    assert stall_detector().detect(Snapshot(now=now, jobs={7: job}, heartbeats=alive)) == []
    [f] = stall_detector().detect(Snapshot(now=now, jobs={7: job}, heartbeats={"crew:h:9": now - 60}))
    assert (f.kind, f.action, f.job_id, f.evidence["reason"]) == ("stall", "kill", 7, "owner_dead")
    expired = dataclasses.replace(job, lease_expires_at=now - 5)
    [f] = stall_detector().detect(Snapshot(now=now, jobs={7: expired}, heartbeats=alive))
    assert "expired" in f.summary


def test_wall_time_budget():
    r = run("r1", started_at=T0)
    obs = [llm("r1", T0 + SETTINGS.budgets.max_wall_s + 5)]
    [f] = stall_detector().detect(snap(obs, now=T0 + SETTINGS.budgets.max_wall_s + 6, runs={"r1": r}))
    assert (f.kind, f.evidence["limit"]) == ("budget", "max_wall_s")


# --- error burst ------------------------------------------------------------------------------------
def test_error_burst_by_failed_runs_and_calls():
    det = ErrorBurstDetector(DET.error_burst)
    now = T0 + 1000
    finished = [(now - 10 * i, "error") for i in range(3)] + [(now - 5, "ticketed")] * 10
    fleet = FleetStats()
    fleet.observe({"x": [llm("x", now - 20 - i, error="HTTP 500") for i in range(2)]})
    [f] = det.detect(Snapshot(now=now, finished=finished, fleet=fleet))
    assert f.kind == "error_burst" and f.evidence["failed_runs"] == 3 and f.evidence["failed_llm_calls"] == 2
    # Old errors are outside the window; a few errors among many successes are fine.
    old = [(now - DET.error_burst.window_s - 1, "error")] * 10
    assert det.detect(Snapshot(now=now, finished=old + finished[:3] + finished[3:])) == []


def test_low_success_rate_pages():
    det = ErrorBurstDetector(DET.error_burst)
    now = T0 + 1000
    finished = [(now - 1, "killed")] * 4 + [(now - 1, "ticketed")] * 2
    [f] = det.detect(Snapshot(now=now, finished=finished))
    assert f.evidence["success_rate"] < DET.error_burst.min_success_rate


# --- queue ------------------------------------------------------------------------------------------
def test_review_queue_depth_and_age_and_queued_age():
    det = QueueDetector(DET.queue)
    now = T0 + 100_000
    assert (
        det.detect(Snapshot(now=now, review_open=3, review_oldest_at=now - 60, queued_oldest_at=now - 5))
        == []
    )
    found = det.detect(
        Snapshot(
            now=now,
            review_open=DET.queue.max_review_depth + 1,
            review_oldest_at=now - DET.queue.max_review_age_s - 1,
            queued_oldest_at=now - DET.queue.max_queue_age_s - 1,
        )
    )
    assert sorted(f.dedupe_key for f in found) == ["queue_age:jobs", "queue_age:review", "queue_depth:review"]
    assert {f.action for f in found} == {"page"}
