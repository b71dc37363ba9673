"""LangfuseSource against the Langfuse stand-in, spans ingested through the SDK's OTLP client:
one query per poll for all active runs, cursor paging, 429 Retry-After, minimum poll interval."""

from __future__ import annotations

import json
import time

import pytest
from langfuse.api import LangfuseAPI
from langfuse.api.opentelemetry.types import (
    OtelAttribute,
    OtelAttributeValue,
    OtelResourceSpan,
    OtelScopeSpan,
    OtelSpan,
)

from crewguard.clock import FakeClock
from crewguard.standins.langfuse import LangfuseStandin
from crewguard.supervisor.detectors.loop import LoopDetector
from crewguard.supervisor.model import ActiveRun, Snapshot
from crewguard.supervisor.sources import SourceUnavailable
from crewguard.supervisor.sources import langfuse as lf_source
from crewguard.supervisor.sources.langfuse import LangfuseSource
from tests.supervisor.sv_helpers import make_settings

_ids = iter(range(1, 10_000))


def attr(key: str, value) -> OtelAttribute:
    v = (
        OtelAttributeValue(int_value=value)
        if isinstance(value, int)
        else OtelAttributeValue(string_value=str(value))
    )
    return OtelAttribute(key=key, value=v)


def span(run_id: str, kind: str, name: str, start: float, end: float, *, input_=None, usage=None) -> OtelSpan:
    attrs = [attr("langfuse.observation.type", kind), attr("langfuse.session.id", run_id)]
    attrs.append(attr("langfuse.trace.metadata.run_id", run_id))
    if input_ is not None:
        attrs.append(attr("langfuse.observation.input", json.dumps(input_, sort_keys=True)))
    if usage is not None:
        attrs.append(attr("langfuse.observation.usage_details", json.dumps(usage)))
        attrs.append(attr("langfuse.observation.model.name", "gpt-4o-mini"))
    n = next(_ids)
    return OtelSpan(
        trace_id=f"{hash(run_id) & (2**64 - 1):032x}",
        span_id=f"{n:016x}",
        name=name,
        start_time_unix_nano=int(start * 1e9),
        end_time_unix_nano=int(end * 1e9),
        attributes=attrs,
    )


@pytest.fixture
def standin():
    with LangfuseStandin(port=0) as server:
        yield server


def client(standin: LangfuseStandin) -> LangfuseAPI:
    return LangfuseAPI(base_url=standin.base_url, username=standin.public_key, password=standin.secret_key)


def ingest(standin: LangfuseStandin, spans: list[OtelSpan]) -> None:
    client(standin).opentelemetry.export_traces(
        resource_spans=[OtelResourceSpan(scope_spans=[OtelScopeSpan(spans=spans)])]
    )


def test_one_paged_query_for_all_active_runs_feeds_the_loop_detector(standin, monkeypatch):
    monkeypatch.setattr(lf_source, "PAGE_LIMIT", 3)  # force cursor paging
    t = time.time() - 60
    spans = [
        span("r1", "tool", "search_knowledge_base", t + i, t + i + 0.5, input_={"q": "refund"})
        for i in range(4)
    ]
    spans.append(
        span(
            "r1",
            "generation",
            "llm",
            t + 5,
            t + 6,
            input_=[{"role": "user"}],
            usage={"input": 900, "output": 100},
        )
    )
    spans += [
        span("r2", "tool", "lookup_sender_history", t + i, t + i + 1, input_={"s": i}) for i in range(3)
    ]
    spans.append(span("r-ended", "tool", "lookup_sender_history", t, t + 1, input_={"s": 0}))
    ingest(standin, spans)
    settings = make_settings()
    source = LangfuseSource(settings, api=client(standin), clock=FakeClock(time.time()))
    runs = {rid: ActiveRun(rid, 1, "k" * 64, t - 1) for rid in ("r1", "r2")}
    before = len([r for r in standin.requests if r[0] == "GET"])

    obs = source.observations_for(runs)

    gets = len([r for r in standin.requests if r[0] == "GET"]) - before
    assert gets == source.requests == 3  # 8 rows of interest + 1 other in pages of 3, one poll
    assert source.polls == 1
    assert set(obs) == {"r1", "r2"} and len(obs["r1"]) == 5 and len(obs["r2"]) == 3
    r1 = obs["r1"]
    assert [o.kind for o in r1] == ["TOOL"] * 4 + ["LLM"]  # ordered by start time
    assert r1[-1].total_tokens == 1000 and r1[-1].model == "gpt-4o-mini" and r1[-1].ended_at is not None
    assert len({o.args_key for o in obs["r2"]}) == 3 and len({o.args_key for o in r1[:4]}) == 1
    found = LoopDetector(settings.supervisor.detectors.loop, settings.budgets).detect(
        Snapshot(now=time.time(), runs=runs, observations=obs)
    )
    assert [(f.kind, f.run_id) for f in found] == [("loop", "r1")]


def test_rate_limit_retry_after_and_minimum_poll_interval(standin):
    t = time.time() - 30
    ingest(standin, [span("r1", "tool", "lookup", t, t + 1, input_={"a": 1})])
    clock = FakeClock(time.time())
    source = LangfuseSource(make_settings(), api=client(standin), clock=clock, min_poll_s=5)
    runs = {"r1": ActiveRun("r1", 1, "k" * 64, t - 1)}
    assert len(source.observations_for(runs)["r1"]) == 1
    clock.advance(1)
    assert len(source.observations_for(runs)["r1"]) == 1 and source.requests == 1  # answered from cache

    clock.advance(5)
    standin.retry_after = 20
    standin.fail_next(1, 429)
    with pytest.raises(SourceUnavailable) as err:
        source.observations_for(runs)
    assert err.value.retry_after == 20 and source.requests == 2
    clock.advance(10)  # inside Retry-After: no request, the last good answer is kept
    assert len(source.observations_for(runs)["r1"]) == 1 and source.requests == 2
    clock.advance(11)
    ingest(standin, [span("r1", "tool", "lookup", t + 2, t + 3, input_={"a": 1})])
    assert len(source.observations_for(runs)["r1"]) == 2 and source.requests == 3


def test_langfuse_down_or_rejecting_is_source_unavailable(standin):
    clock = FakeClock(time.time())
    runs = {"r1": ActiveRun("r1", 1, "k" * 64, time.time() - 10)}
    source = LangfuseSource(make_settings(), api=client(standin), clock=clock, min_poll_s=0)
    standin.fail_next(1, 503)
    with pytest.raises(SourceUnavailable, match="503"):
        source.observations_for(runs)
    bad = LangfuseAPI(base_url=standin.base_url, username="pk", password="wrong")
    with pytest.raises(SourceUnavailable, match="401") as err:
        LangfuseSource(make_settings(), api=bad, clock=clock).observations_for(runs)
    assert "wrong" not in str(err.value)
    standin.down = True
    with pytest.raises(SourceUnavailable):
        source.observations_for(runs)


def test_missing_credentials_is_a_clear_error(monkeypatch):
    for var in ("LANGFUSE_BASE_URL", "LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="LANGFUSE_PUBLIC_KEY"):
        LangfuseSource(make_settings())
