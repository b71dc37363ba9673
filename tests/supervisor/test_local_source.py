"""LocalFeedSource: pairs span starts and ends from trace_events, sees in-flight calls, reads incrementally."""

from __future__ import annotations

from crewguard.clock import FakeClock
from crewguard.crew.ledger.db import open_engine
from crewguard.supervisor.model import ActiveRun
from crewguard.supervisor.sources.local import LocalFeedSource
from tests.supervisor.sv_helpers import T0, feed, llm_events, start_run, tool_events


def active(claim, started_at=T0) -> dict[str, ActiveRun]:
    return {claim.run_id: ActiveRun(claim.run_id, claim.job_id, claim.email_key, started_at)}


def test_pairs_start_and_end_and_sees_in_flight_calls(ledger_url):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    claim = start_run(engine, clock)
    rid = claim.run_id
    feed(engine, llm_events(rid, "a1", T0 + 1, T0 + 2, tokens=1200, prompt_sha="p1"))
    feed(engine, tool_events(rid, "t1", "search_knowledge_base", {"q": "refund", "k": 3}, T0 + 3, None))
    source = LocalFeedSource(engine, clock=clock)
    obs = source.observations_for(active(claim))[rid]
    assert [(o.span_id, o.kind) for o in obs] == [("a1", "LLM"), ("t1", "TOOL")]
    first, call = obs
    assert first.ended_at == T0 + 2 and first.total_tokens == 1200 and first.prompt_sha == "p1"
    assert call.ended_at is None and call.tool == "search_knowledge_base" and call.args_key

    # The tool call ends and a new LLM call starts: the next read is incremental and updates state.
    feed(engine, tool_events(rid, "t1", "search_knowledge_base", {"q": "refund", "k": 3}, T0 + 3, T0 + 4)[1:])
    feed(engine, llm_events(rid, "a2", T0 + 5, None))
    rows_before = source.rows_read
    obs = source.observations_for(active(claim))[rid]
    assert source.rows_read - rows_before == 2
    assert [o.span_id for o in obs] == ["a1", "t1", "a2"]
    assert obs[1].ended_at == T0 + 4 and obs[2].ended_at is None


def test_same_args_give_the_same_key_whatever_the_order(ledger_url):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    claim = start_run(engine, clock)
    rid = claim.run_id
    feed(engine, tool_events(rid, "t1", "lookup", {"a": 1, "b": 2}, T0 + 1, T0 + 2))
    feed(engine, tool_events(rid, "t2", "lookup", {"b": 2, "a": 1}, T0 + 3, T0 + 4))
    feed(engine, tool_events(rid, "t3", "lookup", {"a": 1, "b": 3}, T0 + 5, T0 + 6))
    t1, t2, t3 = LocalFeedSource(engine, clock=clock).observations_for(active(claim))[rid]
    assert t1.args_key == t2.args_key != t3.args_key


def test_first_read_covers_active_runs_only_and_forgets_ended_runs(ledger_url):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    live = start_run(engine, clock, 1)
    gone = start_run(engine, clock, 2)
    feed(engine, llm_events(live.run_id, "l1", T0 + 1, T0 + 2))
    feed(engine, llm_events(gone.run_id, "g1", T0 + 1, T0 + 2))
    source = LocalFeedSource(engine, clock=clock)
    both = {**active(live), **active(gone)}
    assert set(source.observations_for(both)) == {live.run_id, gone.run_id}
    # `gone` ends: it is no longer asked for and its state is dropped after a while.
    clock.advance(600)
    assert set(source.observations_for(active(live))) == {live.run_id}
    assert gone.run_id not in source._spans


def test_end_before_start_is_paired(ledger_url):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    claim = start_run(engine, clock)
    rid = claim.run_id
    start, end = llm_events(rid, "x1", T0 + 1, T0 + 2)
    feed(engine, [end])
    source = LocalFeedSource(engine, clock=clock)
    source.observations_for(active(claim))
    feed(engine, [start])
    [ob] = source.observations_for(active(claim))[rid]
    assert (ob.started_at, ob.ended_at, ob.model) == (T0 + 1, T0 + 2, "openai/gpt-4o-mini")
