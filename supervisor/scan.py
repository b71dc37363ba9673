"""One supervisor scan: read the ledger and the trace source, run the detectors, act on findings.

`Supervisor.scan_once()` is the unit the daemon schedules and tests call directly with a FakeClock.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.heartbeats import SUPERVISOR, beat
from crewguard.crew.ledger.schema import JOB_QUEUED, JOB_RUNNING, heartbeats, jobs, review_items, runs
from crewguard.settings import Settings
from crewguard.supervisor.actions import incidents as incident_actions
from crewguard.supervisor.actions.kill import kill
from crewguard.supervisor.detectors import Detector, build_detectors
from crewguard.supervisor.model import ActiveRun, Finding, FleetStats, RunningJob, Snapshot
from crewguard.supervisor.sources import SourceUnavailable, TraceSource

log = logging.getLogger(__name__)

#: Open review items count toward the queue detector.
REVIEW_OPEN = "open"
#: Incident kinds whose condition is fleet-wide and derived from observations.
FLEET_KINDS_FROM_OBSERVATIONS = frozenset({"token_spike", "error_burst"})


@dataclass
class ScanReport:
    at: float
    duration_s: float = 0.0
    active_runs: int = 0
    observations: int = 0
    source_error: str | None = None
    findings: list[Finding] = field(default_factory=list)
    opened: list[int] = field(default_factory=list)
    repeated: list[int] = field(default_factory=list)
    kill_requested: list[int] = field(default_factory=list)  # job ids
    killed_here: list[int] = field(default_factory=list)  # job ids
    resolved: list[int] = field(default_factory=list)
    escalated: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Supervisor:
    """Reads runs and observations, runs detectors, opens incidents, kills and pages."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        source: TraceSource,
        *,
        clock: Clock = SYSTEM_CLOCK,
        detectors: list[Detector] | None = None,
        host: str | None = None,
    ) -> None:
        """`detectors`: default from settings; `host`: this machine's name (direct kills only here)."""
        self.engine = engine
        self.settings = settings
        self.source = source
        self.clock = clock
        self.detectors = build_detectors(settings) if detectors is None else detectors
        self.host = host or socket.gethostname()
        self.fleet = FleetStats()

    # --- reading -------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        now = self.clock.now()
        window_s = self.settings.supervisor.detectors.error_burst.window_s
        with db.read(self.engine) as conn:
            run_rows = conn.execute(  # columns in ActiveRun's field order
                select(
                    runs.c.id,
                    runs.c.job_id,
                    runs.c.email_key,
                    runs.c.started_at,
                    runs.c.last_progress_at,
                    runs.c.llm_calls,
                    runs.c.prompt_tokens,
                    runs.c.completion_tokens,
                    runs.c.cost_usd,
                    runs.c.pid,
                    runs.c.host,
                ).where(runs.c.ended_at.is_(None))
            ).all()
            job_rows = conn.execute(  # columns in RunningJob's field order
                select(
                    jobs.c.id,
                    jobs.c.email_key,
                    jobs.c.run_id,
                    jobs.c.lease_owner,
                    jobs.c.lease_expires_at,
                    jobs.c.host,
                    jobs.c.pid,
                    jobs.c.pgid,
                    jobs.c.attempts,
                    jobs.c.max_attempts,
                    jobs.c.kill_requested_at,
                    jobs.c.kill_incident_id,
                ).where(jobs.c.state == JOB_RUNNING)
            ).all()
            beats = dict(conn.execute(select(heartbeats.c.component, heartbeats.c.at)).all())
            finished = [
                (r.ended_at, r.outcome)
                for r in conn.execute(
                    select(runs.c.ended_at, runs.c.outcome).where(runs.c.ended_at >= now - window_s)
                ).all()
            ]
            review_open, review_oldest = conn.execute(
                select(func.count(), func.min(review_items.c.created_at)).where(
                    review_items.c.state == REVIEW_OPEN
                )
            ).one()
            queued_oldest = conn.execute(
                select(func.min(jobs.c.available_at)).where(
                    jobs.c.state == JOB_QUEUED, jobs.c.available_at <= now
                )
            ).scalar()
        active = {r[0]: ActiveRun(*r) for r in run_rows}
        running = {j[0]: RunningJob(*j) for j in job_rows}
        return Snapshot(
            now=now,
            runs=active,
            jobs=running,
            heartbeats=beats,
            fleet=self.fleet,
            finished=finished,
            review_open=review_open or 0,
            review_oldest_at=review_oldest,
            queued_oldest_at=queued_oldest,
        )

    # --- one scan ------------------------------------------------------------------
    def scan_once(self) -> ScanReport:
        started = time.perf_counter()
        snap = self.snapshot()
        report = ScanReport(at=snap.now, active_runs=len(snap.runs))
        try:
            snap.observations = self.source.observations_for(snap.runs)
        except SourceUnavailable as exc:
            snap.observations_ok = False
            report.source_error = str(exc)
            log.warning("trace source unavailable: %s", exc)
        except Exception as exc:  # a broken source must not stop kills of stalled jobs or queue alerts
            snap.observations_ok = False
            report.source_error = f"{type(exc).__name__}: {exc}"
            log.exception("trace source failed")
        report.observations = snap.observation_count()
        # Fleet statistics also count calls of runs that ended between two scans, when the source keeps them.
        everything = getattr(self.source, "all_observations", None)
        self.fleet.observe(
            everything() if callable(everything) and snap.observations_ok else snap.observations
        )
        self.fleet.prune(snap.now)

        report.findings = self.detect(snap)
        self.act(snap, report)
        self._resolve_and_escalate(snap, report)
        with db.write(self.engine) as conn:
            beat(
                conn,
                SUPERVISOR,
                self.clock.now(),
                {"pid": os.getpid(), "active_runs": report.active_runs, "source_error": report.source_error},
            )
        report.duration_s = time.perf_counter() - started
        return report

    def detect(self, snap: Snapshot) -> list[Finding]:
        by_key: dict[str, Finding] = {}
        for detector in self.detectors:
            try:
                found = detector.detect(snap)
            except Exception:  # one broken detector must not blind the others
                log.exception("detector %s failed", type(detector).__name__)
                continue
            for finding in found:
                kept = by_key.get(finding.dedupe_key)
                if kept is None or (finding.action == "kill" and kept.action != "kill"):
                    by_key[finding.dedupe_key] = finding
        return list(by_key.values())

    def act(self, snap: Snapshot, report: ScanReport) -> None:
        sup = self.settings.supervisor
        recorded = incident_actions.record_findings(
            self.engine, report.findings, clock=self.clock, update_interval_s=sup.update_interval_s
        )
        for incident, finding, is_new in recorded:
            (report.opened if is_new else report.repeated).append(incident.id)
            if finding.action != "kill":
                continue
            try:
                outcome = kill(
                    self.engine,
                    incident.id,
                    finding,
                    grace_s=self.settings.workers.kill_grace_s,
                    heartbeat_timeout_s=sup.heartbeat_timeout_s,
                    clock=self.clock,
                    host=self.host,
                )
            except Exception as exc:  # e.g. the database locked: next scan tries again
                log.exception("kill for incident %s failed", incident.id)
                report.errors.append(f"kill incident {incident.id}: {type(exc).__name__}")
                continue
            if outcome is None:
                continue
            if outcome.requested:
                report.kill_requested.append(outcome.job_id)
            if outcome.killed_here:
                report.killed_here.append(outcome.job_id)

    def _resolve_and_escalate(self, snap: Snapshot, report: ScanReport) -> None:
        seen = {f.dedupe_key for f in report.findings}
        with db.read(self.engine) as conn:
            open_now = incident_actions.load_open(conn)
            still_active = (
                set(
                    conn.execute(
                        select(runs.c.id).where(
                            runs.c.id.in_([i.run_id for i in open_now.values() if i.run_id]),
                            runs.c.ended_at.is_(None),
                        )
                    ).scalars()
                )
                if any(i.run_id for i in open_now.values())
                else set()
            )
        escalate_after_s = self.settings.notify.escalate_after_s
        for key, incident in open_now.items():
            why = None if key in seen else self._resolution(incident, snap, still_active)
            if why is not None:
                incident_actions.resolve(self.engine, incident, why=why, clock=self.clock)
                report.resolved.append(incident.id)
            elif (
                incident.escalated_at is None
                and snap.now - incident.opened_at > escalate_after_s
                and incident_actions.escalate(
                    self.engine, incident, manager=self.settings.notify.slack.manager, clock=self.clock
                )
            ):
                report.escalated.append(incident.id)

    def _resolution(
        self, incident: incident_actions.Incident, snap: Snapshot, still_active: set[str]
    ) -> str | None:
        """Why an incident not seen in this scan is over, or None to keep it open."""
        if incident.run_id is not None:
            if incident.run_id not in still_active:
                return "run ended"
            return "condition cleared" if snap.observations_ok else None
        if not snap.observations_ok and incident.kind in FLEET_KINDS_FROM_OBSERVATIONS:
            return None
        if snap.now - incident.last_seen_at >= self.settings.supervisor.resolve_quiet_s:
            return "condition cleared"
        return None
