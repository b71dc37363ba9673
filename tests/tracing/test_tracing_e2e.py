"""A real CrewAI kickoff traced into the Langfuse stand-in (read back with the official SDK) and into
the ledger's real-time feed; masking modes; Langfuse down or slow; the ledger locked."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import runs, trace_events
from crewguard.crew.tracing import start_tracing
from tests.tracing.conftest import BODY_TEXT, PHONE, SENDER, LedgerRun, kickoff, tracing_settings

pytestmark = pytest.mark.slow

#: Upper bound for a shutdown in these tests: only a hang guard (speed is measured in bench/).
HANG_GUARD_S = 30.0


def traced_run(ledger: LedgerRun, llm_url: str, **settings: Any) -> tuple[Any, Any, bool]:
    """Kick the test crew off inside a run scope with a flow step and an event; shut tracing down."""
    handle = start_tracing(tracing_settings(**settings), ledger.engine)
    claim = ledger.claim
    with handle.run_scope(run_id=claim.run_id, email_key=claim.email_key, job_id=claim.job_id):
        with handle.step("classify.llm", attempt=1) as step:
            result = kickoff(llm_url)
            step.set(classifier="llm")
        handle.event("retry", attempt=2, delay_s=1.3, error="ticket sink timed out")
    done: list[bool] = []
    closer = threading.Thread(target=lambda: done.append(handle.shutdown(timeout_s=2.0)))
    closer.start()
    closer.join(HANG_GUARD_S)
    assert done, "shutdown hung"
    return handle, result, done[0]


def feed_rows(ledger: LedgerRun) -> list[dict[str, Any]]:
    with db.read(ledger.engine) as conn:
        rows = conn.execute(
            sa.select(trace_events)
            .where(trace_events.c.run_id == ledger.claim.run_id)
            .order_by(trace_events.c.id)
        ).all()
    return [{**row._mapping, "attributes": json.loads(row.attributes)} for row in rows]


def read_back(standin: Any, run_id: str) -> list[Any]:
    """Every observation of the run through the SDK's Observations API v2 client, page by page."""
    from langfuse import Langfuse

    client = Langfuse(
        public_key=standin.public_key,
        secret_key=standin.secret_key,
        base_url=standin.base_url,
        tracing_enabled=False,
    )
    out, cursor = [], None
    while True:
        page = client.api.observations.get_many(
            session_id=run_id, fields="core,basic,usage,io,metadata,model", limit=5, cursor=cursor
        )
        out.extend(page.data)
        cursor = page.meta.cursor
        if not cursor:
            return out


def test_kickoff_reaches_langfuse_and_the_local_feed(ledger_run, scenario_llm, langfuse_standin) -> None:
    handle, result, flushed = traced_run(ledger_run, scenario_llm.base_url)
    run_id, email_key = ledger_run.claim.run_id, ledger_run.claim.email_key
    assert result.raw and flushed

    observations = read_back(langfuse_standin, run_id)
    assert len({o.id for o in observations}) == len(observations) == len(langfuse_standin.observations())
    assert all(o.session_id == run_id and o.metadata["email_key"] == email_key for o in observations)
    generations = [o for o in observations if o.type == "GENERATION"]
    assert len(generations) == scenario_llm.calls() >= 2
    assert all(o.model == "gpt-4o-mini" and o.usage_details["input"] > 0 for o in generations)
    tools = [o for o in observations if o.type == "TOOL"]
    assert [json.loads(o.input) for o in tools] == [{"sender": "[email]"}]
    steps = {o.name: o for o in observations if o.metadata.get("step")}
    assert steps["classify.llm"].metadata["classifier"] == "llm" and steps["classify.llm"].type == "SPAN"
    assert steps["retry"].type == "EVENT" and steps["retry"].metadata["delay_s"] == 1.3
    assert steps["crewguard.email"].is_root_observation

    rows = feed_rows(ledger_run)
    llm_starts = [r for r in rows if r["kind"] == "LLM" and r["phase"] == "start"]
    llm_ends = [r for r in rows if r["kind"] == "LLM" and r["phase"] == "end"]
    assert len(llm_starts) == len(llm_ends) == len(generations)
    assert all(
        r["attributes"]["model"] == "gpt-4o-mini" and len(r["attributes"]["prompt_sha"]) == 64
        for r in llm_starts
    )
    assert len({r["attributes"]["prompt_sha"] for r in llm_starts}) == len(llm_starts)  # the prompt grows
    tool_start = next(r for r in rows if r["kind"] == "TOOL" and r["phase"] == "start")
    assert tool_start["attributes"] == {"tool": "lookup_sender_history", "args": '{"sender":"[email]"}'}
    ids = {r["span_id"]: r["id"] for r in rows if r["phase"] == "start"}
    assert all(
        ids[r["span_id"]] < r["id"] for r in rows if r["phase"] == "end"
    )  # a start is seen before its end
    flow = [r["attributes"] for r in rows if r["kind"] == "FLOW" and r["phase"] == "end"]
    assert {"step": "retry", "attempt": 2, "delay_s": 1.3, "error": "ticket sink timed out"} in flow
    assert {"step": "classify.llm", "attempt": 1, "classifier": "llm"} in flow

    with db.read(ledger_run.engine) as conn:
        run = conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()
    prompt = sum(r["attributes"]["prompt_tokens"] for r in llm_ends)
    completion = sum(r["attributes"]["completion_tokens"] for r in llm_ends)
    assert (run.llm_calls, run.tool_calls, run.prompt_tokens, run.completion_tokens) == (
        len(llm_starts),
        1,
        prompt,
        completion,
    )
    assert run.cost_usd == pytest.approx(prompt / 1000 * 0.15 + completion / 1000 * 0.6)
    assert run.last_progress_at == pytest.approx(max(r["at"] for r in rows[:-1]), abs=1.0)
    assert run.wall_s is not None and run.wall_s > 0
    assert handle.usage(run_id).llm_calls == run.llm_calls


def everything_stored(standin: Any, rows: list[dict[str, Any]]) -> str:
    return json.dumps(standin.observations()) + json.dumps(rows, default=str)


@pytest.mark.parametrize("mode", ["off", "contacts", "bodies"])
def test_masking_applies_to_langfuse_and_the_feed(mode, ledger_run, scenario_llm, langfuse_standin) -> None:
    traced_run(ledger_run, scenario_llm.base_url, mask=mode)
    rows = feed_rows(ledger_run)
    stored = everything_stored(langfuse_standin, rows)
    args = next(r for r in rows if r["kind"] == "TOOL")["attributes"]["args"]
    if mode == "off":
        assert SENDER in stored and BODY_TEXT in stored and SENDER in args
    elif mode == "contacts":
        assert SENDER not in stored and PHONE not in stored and "[email]" in args
        assert BODY_TEXT in stored
    else:
        assert SENDER not in stored and PHONE not in stored and BODY_TEXT not in stored
        assert args.startswith("<removed sha256=")
        assert any(r["attributes"].get("prompt_sha") for r in rows)  # loops stay detectable


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("failure", ["refused", "blackhole", "503", "429", "401", "down"])
def test_langfuse_failures_never_fail_the_run(
    failure, request, monkeypatch, ledger_run, scenario_llm, langfuse_standin
) -> None:
    if failure == "refused":
        monkeypatch.setenv("LANGFUSE_BASE_URL", closed_port_url())
    elif failure == "blackhole":
        monkeypatch.setenv("LANGFUSE_BASE_URL", request.getfixturevalue("blackhole"))
    elif failure == "401":
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-wrong")
    elif failure == "down":
        langfuse_standin.down = True
    else:
        langfuse_standin.fail_next(100, int(failure))
    handle, result, flushed = traced_run(ledger_run, scenario_llm.base_url)
    assert result.raw
    assert not langfuse_standin.observations()
    rows = feed_rows(ledger_run)  # the local feed does not depend on Langfuse
    assert any(r["kind"] == "LLM" and r["phase"] == "start" for r in rows)
    assert handle.stats()["dropped"] == 0


def test_locked_ledger_never_fails_the_run(ledger_run, scenario_llm) -> None:
    """Another writer holds SQLite's write lock for the whole kickoff: the run finishes, feed writes
    fail and are retried, and once the lock is released the rows arrive."""
    raw = ledger_run.engine.raw_connection()
    raw.driver_connection.isolation_level = None
    raw.driver_connection.execute("BEGIN IMMEDIATE")
    handle = start_tracing(tracing_settings(langfuse=False), ledger_run.engine)
    claim = ledger_run.claim
    try:
        with handle.run_scope(run_id=claim.run_id, email_key=claim.email_key, job_id=claim.job_id):
            result = kickoff(scenario_llm.base_url)
        assert result.raw
        assert handle.stats()["failed_writes"] > 0
        assert feed_rows(ledger_run) == []
    finally:
        raw.driver_connection.execute("ROLLBACK")
        raw.close()
    assert handle.shutdown(timeout_s=5.0)
    rows = feed_rows(ledger_run)
    assert any(r["kind"] == "TOOL" and r["phase"] == "start" for r in rows)
    assert handle.stats()["dropped"] == 0
