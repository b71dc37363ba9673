"""Kill path with real processes and signals: direct kill of a dead daemon's process group, or a
kill request through the ledger when the owning daemon is alive. The email always ends in review."""

from __future__ import annotations

import json
import signal
import socket
import subprocess

import pytest
from sqlalchemy import select

from crewguard.clock import FakeClock
from crewguard.crew.ledger import db, jobs
from crewguard.crew.ledger.db import open_engine
from crewguard.crew.ledger.heartbeats import beat, crew_component
from crewguard.crew.ledger.schema import audit_log, emails, incidents, pages, review_items, runs
from crewguard.crew.ledger.schema import jobs as jobs_table
from crewguard.supervisor.scan import Supervisor
from tests.supervisor.sv_helpers import T0, make_settings, start_run

HOST = socket.gethostname()


class NoTraces:
    def observations_for(self, active_runs):
        return {}


@pytest.fixture
def child():
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def setup_job(engine, clock, proc, *, owner: str, host: str = HOST):
    claim = start_run(engine, clock, owner=owner, host=host)
    jobs.record_child(engine, claim, pid=proc.pid, pgid=proc.pid, host=host)
    with db.write(engine) as conn:
        beat(conn, crew_component(owner), clock.now())
    return claim


def audit_bodies(engine):
    with db.read(engine) as conn:
        return [
            json.loads(b) for b in conn.execute(select(audit_log.c.body).order_by(audit_log.c.seq)).scalars()
        ]


def test_dead_daemon_process_group_is_killed_and_email_goes_to_review(ledger_url, tmp_path, child):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    claim = setup_job(engine, clock, child, owner="deadhost:4242")
    clock.advance(
        settings.supervisor.heartbeat_timeout_s + settings.supervisor.detectors.stall.heartbeat_s + 5
    )
    sup = Supervisor(engine, settings, NoTraces(), clock=clock, host=HOST)

    report = sup.scan_once()

    assert report.killed_here == [claim.job_id]
    assert child.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)
    [incident_id] = report.opened
    with db.read(engine) as conn:
        inc = conn.execute(select(incidents)).one()
        item = conn.execute(select(review_items)).one()
        job = conn.execute(select(jobs_table)).one()
        run = conn.execute(select(runs)).one()
        email_state = conn.execute(select(emails.c.state)).scalar_one()
        page_kinds = [p for p in conn.execute(select(pages.c.kind).order_by(pages.c.id)).scalars()]
    assert (inc.kind, inc.action, inc.run_id) == ("stall", "killed", claim.run_id)
    assert (item.reason, item.incident_id, item.email_key, item.state) == (
        "killed",
        incident_id,
        claim.email_key,
        "open",
    )
    assert (job.state, email_state, run.outcome) == ("review", "in_review", "killed")
    assert page_kinds[0] == "post" and page_kinds.count("reply") == 2  # kill requested, then killed + review
    events = [(b["event"], b.get("mode")) for b in audit_bodies(engine)]
    assert ("incident.opened", None) in events and ("supervisor.kill", "direct") in events
    assert ("job.killed", None) in events and ("review.opened", None) in events

    # The next scan sees the run ended and resolves the incident; nothing is killed twice.
    clock.advance(1)
    report = sup.scan_once()
    assert report.resolved == [incident_id] and report.killed_here == []


def test_live_daemon_gets_a_kill_request_and_its_process_is_left_to_it(ledger_url, tmp_path, child):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    claim = setup_job(engine, clock, child, owner="livehost:1")
    # A runaway: the run made no progress, but its daemon beats and renews the lease.
    clock.advance(settings.supervisor.detectors.stall.no_progress_s + 5)
    with db.write(engine) as conn:
        beat(conn, crew_component("livehost:1"), clock.now())
    assert jobs.renew_leases(engine, "livehost:1", [claim], lease_s=30, clock=clock) == []
    sup = Supervisor(engine, settings, NoTraces(), clock=clock, host=HOST)

    report = sup.scan_once()

    assert report.kill_requested == [claim.job_id] and report.killed_here == []
    assert child.poll() is None  # the owner kills it, not us
    [incident_id] = report.opened
    [request] = jobs.kill_requests_for(engine, "livehost:1")
    assert (request.job_id, request.incident_id) == (claim.job_id, incident_id)

    # The daemon honours it (kills its child, files the review); the supervisor closes the incident.
    child.kill()
    jobs.finish_killed(engine, claim, reason=request.reason or "", incident_id=incident_id, clock=clock)
    clock.advance(1)
    report = sup.scan_once()
    assert report.resolved == [incident_id]
    with db.read(engine) as conn:
        inc = conn.execute(select(incidents)).one()
        replies = conn.execute(select(pages.c.text).where(pages.c.kind == "reply")).scalars().all()
    assert inc.action == "killed" and inc.state == "resolved"
    assert any("review" in r for r in replies)


def test_dead_daemon_on_another_host_is_not_killed_from_here(ledger_url, tmp_path, child):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)
    claim = setup_job(engine, clock, child, owner="elsewhere:1", host="some-other-host")
    clock.advance(120)
    report = Supervisor(engine, settings, NoTraces(), clock=clock, host=HOST).scan_once()
    assert report.killed_here == [] and report.kill_requested == [claim.job_id]
    assert child.poll() is None


def test_refuses_to_kill_its_own_process_group():
    import os

    from crewguard.crew.workers.procgroup import kill_group

    with pytest.raises(ValueError):
        kill_group(os.getpgrp(), 0)
