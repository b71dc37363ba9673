"""Incidents: one per problem, one post page, repeats bump the count, paced updates, escalation, resolution."""

from __future__ import annotations

import json

from sqlalchemy import select

from crewguard.clock import FakeClock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.db import open_engine
from crewguard.crew.ledger.schema import audit_log, incidents, pages
from crewguard.supervisor.actions import incidents as inc
from crewguard.supervisor.model import Finding, Snapshot
from crewguard.supervisor.scan import Supervisor
from tests.supervisor.sv_helpers import T0, make_settings

QUEUE = Finding(
    kind="queue_depth", dedupe_key="queue_depth:review", summary="review queue holds 30", action="page"
)


def page_rows(engine):
    with db.read(engine) as conn:
        return conn.execute(
            select(pages.c.incident_id, pages.c.kind, pages.c.text).order_by(pages.c.id)
        ).all()


def audit_events(engine):
    with db.read(engine) as conn:
        return [
            json.loads(b)["event"]
            for b in conn.execute(select(audit_log.c.body).order_by(audit_log.c.seq)).scalars()
        ]


def test_one_incident_per_problem_and_paced_updates(ledger_url):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    first, new = inc.open_incident(engine, QUEUE, clock=clock, update_interval_s=300)
    assert new
    for _ in range(5):
        clock.advance(10)
        again, new = inc.open_incident(engine, QUEUE, clock=clock, update_interval_s=300)
        assert (again, new) == (first, False)
    with db.read(engine) as conn:
        row = conn.execute(select(incidents)).one()
    assert (row.count, row.state, row.last_seen_at, row.kind) == (6, "open", T0 + 50, "queue_depth")
    assert [(p.incident_id, p.kind) for p in page_rows(engine)] == [(first, "post")]
    assert audit_events(engine).count("incident.opened") == 1
    clock.advance(300)  # a new update period has begun: one update, not one per repeat
    inc.open_incident(engine, QUEUE, clock=clock, update_interval_s=300)
    inc.open_incident(engine, QUEUE, clock=clock, update_interval_s=300)
    assert [p.kind for p in page_rows(engine)] == ["post", "update"]
    assert "seen 7 times" in page_rows(engine)[-1].text


def test_escalation_once_and_resolution_after_quiet_period(ledger_url, tmp_path):
    clock = FakeClock(T0)
    engine = open_engine(ledger_url)
    settings = make_settings(tmp_path)

    class Queue:  # a detector double: the queue problem is there while `on` is set
        on = True

        def detect(self, snapshot: Snapshot) -> list[Finding]:
            return [QUEUE] if self.on else []

    det = Queue()
    sup = Supervisor(engine, settings, source=EmptySource(), clock=clock, detectors=[det])
    report = sup.scan_once()
    [incident_id] = report.opened
    clock.advance(settings.notify.escalate_after_s + 1)
    assert sup.scan_once().escalated == [incident_id]
    clock.advance(60)
    assert sup.scan_once().escalated == []
    escalations = [p for p in page_rows(engine) if p.kind == "reply"]
    assert len(escalations) == 1 and "support-manager" in escalations[0].text
    det.on = False
    clock.advance(1)
    assert sup.scan_once().resolved == []  # not yet quiet for resolve_quiet_s
    clock.advance(settings.supervisor.resolve_quiet_s)
    assert sup.scan_once().resolved == [incident_id]
    with db.read(engine) as conn:
        row = conn.execute(select(incidents)).one()
    assert row.state == "resolved" and row.escalated_at is not None and row.resolved_at == clock.now()
    assert page_rows(engine)[-1].kind == "update" and "RESOLVED" in page_rows(engine)[-1].text
    assert {"incident.opened", "incident.escalated", "incident.resolved"} <= set(audit_events(engine))
    det.on = True  # the problem comes back: a new incident
    assert sup.scan_once().opened and sup.scan_once().opened == []


class EmptySource:
    def observations_for(self, active_runs):
        return {}
