"""Killing a runaway run: ask the owning crew daemon through the ledger; when that daemon is dead
and the job runs on this host, kill the process group here and hand the email to review ourselves.

Either way the email ends in exactly one place (a review item carrying the incident id), and every
step is in the audit log in the same transaction as its state change.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from sqlalchemy import Engine, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import audit, db, jobs
from crewguard.crew.ledger.heartbeats import crew_component, last_seen
from crewguard.crew.ledger.schema import JOB_RUNNING
from crewguard.crew.ledger.schema import jobs as jobs_table
from crewguard.crew.workers import procgroup
from crewguard.supervisor.actions.incidents import ACTION_KILL_REQUESTED, ACTION_KILLED, reply, set_action
from crewguard.supervisor.model import Finding, owner_dead_reason

log = logging.getLogger(__name__)

#: Poll period while waiting for a process group to exit after SIGTERM.
GROUP_POLL_S = 0.05


@dataclass(frozen=True)
class KillOutcome:
    job_id: int
    requested: bool  # a kill request was written this time
    killed_here: bool  # this process killed the process group
    review_id: int | None
    detail: str


def kill(
    engine: Engine,
    incident_id: int,
    finding: Finding,
    *,
    grace_s: float,
    heartbeat_timeout_s: float,
    clock: Clock = SYSTEM_CLOCK,
    host: str | None = None,
) -> KillOutcome | None:
    """Kill the run behind `finding`; None when its job is no longer running that run."""
    host = host or socket.gethostname()
    with db.read(engine) as conn:
        stmt = select(jobs_table)
        if finding.job_id is not None:
            stmt = stmt.where(jobs_table.c.id == finding.job_id)
        elif finding.run_id is not None:
            stmt = stmt.where(jobs_table.c.run_id == finding.run_id)
        else:
            return None
        job = conn.execute(stmt).first()
        if job is None or job.state != JOB_RUNNING:
            return None
        if finding.run_id and job.run_id and job.run_id != finding.run_id:
            return None  # the job moved on to a new attempt: never kill a run that did nothing wrong
        beat = last_seen(conn, crew_component(job.lease_owner or ""))
    requested = False
    if job.kill_requested_at is None:
        requested = jobs.request_kill(
            engine, job.id, reason=finding.summary, incident_id=incident_id, clock=clock
        )
        if requested:
            with db.write(engine) as conn:
                set_action(conn, incident_id, ACTION_KILL_REQUESTED)
                audit.append(
                    conn,
                    "supervisor.kill",
                    email_key=job.email_key,
                    clock=clock,
                    mode="requested",
                    incident_id=incident_id,
                    job_id=job.id,
                    run_id=job.run_id,
                    owner=job.lease_owner,
                    kind=finding.kind,
                )
                reply(
                    conn,
                    incident_id,
                    f"kill requested for run {job.run_id} (job {job.id}, owner {job.lease_owner})",
                    clock=clock,
                )
    now = clock.now()
    dead = owner_dead_reason(job.lease_owner, beat, job.lease_expires_at, now, heartbeat_timeout_s)
    if dead is None:
        return KillOutcome(job.id, requested, False, None, "kill requested from the owning daemon")
    if job.host != host or not job.pgid:
        detail = f"owner dead ({dead}) but the job runs on {job.host or 'an unknown host'}: cannot kill from {host}"
        log.warning("incident %s: %s", incident_id, detail)
        return KillOutcome(job.id, requested, False, None, detail)
    signals = procgroup.kill_group(job.pgid, grace_s, clock=clock)
    claim = jobs.Claim(
        job_id=job.id,
        email_key=job.email_key,
        owner=job.lease_owner,
        attempt=job.attempts,
        max_attempts=job.max_attempts,
        run_id=job.run_id,
    )
    try:
        review_id = jobs.finish_killed(
            engine, claim, reason=finding.summary, incident_id=incident_id, clock=clock
        )
    except jobs.LeaseLost as exc:
        # The owner came back and finished the job meanwhile: its outcome stands.
        return KillOutcome(job.id, requested, True, None, f"killed, but the job was already settled: {exc}")
    with db.write(engine) as conn:
        set_action(conn, incident_id, ACTION_KILLED)
        audit.append(
            conn,
            "supervisor.kill",
            email_key=job.email_key,
            clock=clock,
            mode="direct",
            incident_id=incident_id,
            job_id=job.id,
            run_id=job.run_id,
            pgid=job.pgid,
            host=host,
            signals=signals,
            owner_dead=dead,
            review_id=review_id,
        )
        reply(
            conn,
            incident_id,
            clock=clock,
            text=f"owner {job.lease_owner} is dead ({dead}): killed process group {job.pgid} on {host}; "
            f"the email is in review (item #{review_id})",
        )
    return KillOutcome(job.id, requested, True, review_id, f"killed process group {job.pgid}")
