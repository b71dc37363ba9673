"""Supervisor scans over the real ledger and the local feed, and the daemon's --once path."""

from __future__ import annotations

import io

from sqlalchemy import select

from crewguard.clock import FakeClock
from crewguard.crew import paging
from crewguard.crew.ledger import db, jobs
from crewguard.crew.ledger.db import open_engine
from crewguard.crew.ledger.heartbeats import beat, crew_component
from crewguard.crew.ledger.schema import heartbeats, incidents, pages
from crewguard.supervisor.daemon import SupervisorDaemon
from crewguard.supervisor.scan import Supervisor
from crewguard.supervisor.sources import SourceUnavailable
from crewguard.supervisor.sources.local import LocalFeedSource
from tests.supervisor.sv_helpers import T0, feed, llm_events, make_settings, start_run, tool_events


def keep_alive(engine, clock, claim, owner="host:1"):
    with db.write(engine) as conn:
        beat(conn, crew_component(owner), clock.now())
    jobs.renew_leases(engine, owner, [claim], lease_s=30, clock=clock)


def test_looping_run_gets_one_incident_and_one_kill_request(ledger_url, tmp_path):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    looping = start_run(engine, clock, 1)
    working = start_run(engine, clock, 2)
    for i in range(4):  # the same search four times
        feed(
            engine,
            tool_events(
                looping.run_id, f"l{i}", "search_knowledge_base", {"q": "refund"}, T0 + i, T0 + i + 0.5
            ),
        )
        feed(
            engine,
            tool_events(
                working.run_id, f"w{i}", "search_knowledge_base", {"q": f"refund {i}"}, T0 + i, T0 + i + 0.5
            ),
        )
    clock.advance(5)
    keep_alive(engine, clock, looping)
    keep_alive(engine, clock, working)
    sup = Supervisor(engine, settings, LocalFeedSource(engine, clock=clock), clock=clock)

    first = sup.scan_once()
    clock.advance(1)
    second = sup.scan_once()

    assert [(f.kind, f.run_id) for f in first.findings] == [("loop", looping.run_id)]
    assert first.kill_requested == [looping.job_id] and len(first.opened) == 1
    assert second.opened == [] and second.repeated == first.opened and second.kill_requested == []
    with db.read(engine) as conn:
        inc = conn.execute(select(incidents)).one()
        kinds = conn.execute(select(pages.c.kind).order_by(pages.c.id)).scalars().all()
        sup_beat = conn.execute(select(heartbeats).where(heartbeats.c.component == "supervisor")).one()
    assert (inc.count, inc.action, inc.kind) == (2, "kill_requested", "loop")
    assert kinds == ["post", "reply"]
    assert sup_beat.at == clock.now()
    [req] = jobs.kill_requests_for(engine, "host:1")
    assert req.job_id == looping.job_id and req.incident_id == inc.id


class FailingSource:
    def observations_for(self, active_runs):
        raise SourceUnavailable("Langfuse rate limit (429)", 10)


def test_failing_source_degrades_without_false_resolution(ledger_url, tmp_path):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    claim = start_run(engine, clock)
    for i in range(3):
        feed(engine, llm_events(claim.run_id, f"a{i}", T0 + i, T0 + i + 0.5, prompt_sha="same"))
    keep_alive(engine, clock, claim)
    sup = Supervisor(engine, settings, LocalFeedSource(engine, clock=clock), clock=clock)
    [incident_id] = sup.scan_once().opened
    sup.source = FailingSource()
    clock.advance(1)
    report = sup.scan_once()
    assert report.source_error and report.resolved == []  # the loop is not "cleared" by missing data
    with db.read(engine) as conn:
        assert (
            conn.execute(select(incidents.c.state).where(incidents.c.id == incident_id)).scalar_one()
            == "open"
        )
        assert (
            conn.execute(select(heartbeats.c.at).where(heartbeats.c.component == "supervisor")).scalar_one()
            == clock.now()
        )


def test_daemon_once_scans_and_delivers_pages_to_the_console(ledger_url, tmp_path, monkeypatch):
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    claim = start_run(engine, clock)
    feed(engine, llm_events(claim.run_id, "big", T0 + 1, T0 + 2, tokens=settings.budgets.max_tokens + 1))
    keep_alive(engine, clock, claim)
    out = io.StringIO()
    pager = paging.Pager(engine, settings, client=paging.ConsoleTransport(out), clock=clock)
    daemon = SupervisorDaemon(
        settings, engine=engine, source=LocalFeedSource(engine, clock=clock), clock=clock, pager=pager
    )

    report = daemon.run_once()

    assert report is not None and [f.kind for f in report.findings] == ["budget"]
    assert "[budget]" in out.getvalue() and "kill requested" in out.getvalue()
    with db.read(engine) as conn:
        assert set(conn.execute(select(pages.c.state)).scalars()) == {"sent"}


def test_daemon_survives_a_broken_ledger(tmp_path):
    settings = make_settings(tmp_path)
    engine = open_engine(f"sqlite:///{tmp_path / 'l.db'}")
    daemon = SupervisorDaemon(settings, engine=engine, source=FailingSource(), pager=_NoPager())
    engine.dispose()
    (tmp_path / "l.db").unlink()
    (tmp_path / "l.db").mkdir()  # the database path is now a directory: every query fails
    assert daemon.scan() is None and daemon.deliver_pages() == 0


class _NoPager:
    def deliver_pending(self):
        raise RuntimeError("slack down")


def test_fleet_statistics_count_calls_of_runs_that_ended_between_scans(ledger_url, tmp_path):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    sup = Supervisor(engine, settings, LocalFeedSource(engine, clock=clock), clock=clock)
    sup.scan_once()
    claim = start_run(engine, clock)
    feed(engine, llm_events(claim.run_id, "e1", T0 + 1, T0 + 2, tokens=700))
    with db.write(engine) as conn:
        jobs.send_to_review(conn, claim, email_key=claim.email_key, reason="unclassified", clock=clock)
    clock.advance(3)
    sup.scan_once()
    assert [c.tokens for c in sup.fleet.calls] == [700]
