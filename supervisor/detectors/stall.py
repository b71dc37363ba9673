"""Stalls: a live run with no progress, a call in flight for too long, a run past its wall-time
budget, and a running job whose owner stopped beating (lease expired or heartbeat stale).
"""

from __future__ import annotations

from crewguard.crew.ledger.heartbeats import crew_component
from crewguard.settings import BudgetSettings
from crewguard.settings import StallDetector as StallSettings
from crewguard.supervisor.model import LLM, TOOL, Finding, Snapshot, owner_dead_reason


class StallDetector:
    def __init__(self, cfg: StallSettings, budgets: BudgetSettings) -> None:
        self.cfg = cfg
        self.max_wall_s = budgets.max_wall_s

    def detect(self, snapshot: Snapshot) -> list[Finding]:
        now = snapshot.now
        findings: list[Finding] = []
        flagged: set[str] = set()
        for run_id, run in snapshot.runs.items():
            ids = {"run_id": run_id, "job_id": run.job_id, "email_key": run.email_key}
            obs = snapshot.observations.get(run_id, [])
            wall = now - run.started_at
            if wall > self.max_wall_s:
                findings.append(
                    Finding(
                        kind="budget",
                        dedupe_key=f"budget:{run_id}",
                        summary=f"budget: run {run_id} running for {wall:.0f} s (max {self.max_wall_s:g} s)",
                        action="kill",
                        evidence={"limit": "max_wall_s", "value": round(wall, 1), "max": self.max_wall_s},
                        **ids,
                    )
                )
            if not snapshot.observations_ok:
                continue  # progress is unknown while the trace source is down
            in_flight = [
                o
                for o in obs
                if o.ended_at is None and o.kind in (LLM, TOOL) and now - o.started_at > self.cfg.call_s
            ]
            last = max([run.started_at, run.last_progress_at or 0.0] + [o.last_event_at for o in obs])
            if in_flight:
                ob = min(in_flight, key=lambda o: o.started_at)
                summary = f"stall: {ob.kind} call {ob.tool or ob.name} in flight for {now - ob.started_at:.0f} s in run {run_id}"
                evidence = {
                    "reason": "call_in_flight",
                    "span_id": ob.span_id,
                    "seconds": round(now - ob.started_at, 1),
                }
            elif now - last > self.cfg.no_progress_s:
                summary = f"stall: run {run_id} made no progress for {now - last:.0f} s"
                evidence = {"reason": "no_progress", "seconds": round(now - last, 1)}
            else:
                continue
            flagged.add(run_id)
            findings.append(
                Finding(
                    kind="stall",
                    dedupe_key=f"stall:{run_id}",
                    summary=summary,
                    action="kill",
                    evidence=evidence,
                    **ids,
                )
            )
        for job in snapshot.jobs.values():
            beat = snapshot.heartbeats.get(crew_component(job.lease_owner)) if job.lease_owner else None
            why = owner_dead_reason(job.lease_owner, beat, job.lease_expires_at, now, self.cfg.heartbeat_s)
            if why is None:
                continue
            key = job.run_id or f"job-{job.job_id}"
            if job.run_id and job.run_id in flagged:
                continue  # one incident per run
            findings.append(
                Finding(
                    kind="stall",
                    dedupe_key=f"stall:{key}",
                    summary=f"stall: job {job.job_id} is running but its owner looks dead: {why}",
                    action="kill",
                    evidence={
                        "reason": "owner_dead",
                        "owner": job.lease_owner,
                        "detail": why,
                        "host": job.host,
                    },
                    run_id=job.run_id,
                    job_id=job.job_id,
                    email_key=job.email_key,
                )
            )
        return findings
