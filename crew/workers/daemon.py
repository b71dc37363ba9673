"""The crew daemon: claims jobs from the ledger and runs each in its own child process group.

One loop, no threads of its own except one per kill in progress:
  intake -> claim (up to N) -> start child -> heartbeat leases -> honour kill requests -> reap.
A child that dies without recording an outcome becomes a failed attempt (retry with backoff,
then review). A kill request ends the job's process group and sends the email to review.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from typing import Protocol

from sqlalchemy import Engine, func, select

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import audit, db, heartbeats, jobs
from crewguard.crew.ledger.schema import JOB_QUEUED, JOB_RUNNING
from crewguard.crew.ledger.schema import jobs as jobs_table
from crewguard.crew.workers import child, procgroup
from crewguard.crew.workers.config_reload import ConfigReloader
from crewguard.crew.workers.handlers import job_retry_policy
from crewguard.settings import Settings

log = logging.getLogger("crewguard.crew")

for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",  # telemetry turns SIGTERM into exit 0 after 10 s
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}.items():
    os.environ.setdefault(_name, _value)

#: How often the daemon looks for kill requests and dead children (seconds).
TICK_S = 0.1
#: How often the supervisor's heartbeat is checked.
SUPERVISOR_CHECK_S = 10.0
#: Always preloaded by the fork server: what every child imports (else each child pays ~0.3 s for them).
CHILD_MODULES = (
    "crewguard.crew.workers.child",
    "crewguard.crew.workers.handlers",
    "crewguard.crew.ledger.db",
)
#: Longest wait for a new child to lead its own process group before its pgid is recorded.
GROUP_READY_S = 5.0
#: How often a new child's process group is checked while waiting for it.
GROUP_READY_POLL_S = 0.001
#: How often a signed audit checkpoint is considered (one is written every audit.checkpoint_every entries).
CHECKPOINT_S = 30.0


class Intake(Protocol):
    """Anything that brings emails into the ledger; polled by the daemon loop."""

    name: str

    def poll(self) -> int: ...


@dataclass
class RunningJob:
    claim: jobs.Claim
    process: BaseProcess
    started_at: float
    killing: bool = False


@dataclass
class DaemonStats:
    started: int = 0
    finished: int = 0
    crashed: int = 0
    killed: int = 0
    lease_lost: int = 0
    child_start_s: list[float] = field(default_factory=list)


def _wait_for_group_leader(pid: int) -> None:
    """Wait until child `pid` leads its own process group (it calls setpgid first thing), or is gone."""
    deadline = time.monotonic() + GROUP_READY_S
    while time.monotonic() < deadline:
        try:
            if os.getpgid(pid) == pid:
                return
        except ProcessLookupError:
            return  # it died already; the reaper records the attempt
        time.sleep(GROUP_READY_POLL_S)
    log.warning("child %s did not become a process group leader within %.0f s", pid, GROUP_READY_S)


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class CrewDaemon:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        workers: int | None = None,
        intakes: list[Intake] | None = None,
        config_path: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.config = ConfigReloader(config_path, settings)
        self.engine = engine or db.open_engine(settings.db_url)
        self.workers = workers or settings.workers.count
        self.intakes = intakes if intakes is not None else []
        self.clock = clock
        self.owner = new_owner_id()
        self.host = socket.gethostname()
        self.running: dict[int, RunningJob] = {}
        self.stats = DaemonStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload([*settings.workers.preload, *CHILD_MODULES])
        self._last_heartbeat = 0.0
        self._last_supervisor_check = 0.0
        self._last_checkpoint = 0.0
        self._supervisor_warned = False

    # --- lifecycle -----------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, *, once: bool = False) -> None:
        """Work until stopped (or, with `once`, until no email is queued or running)."""
        log.info(
            "crew daemon %s: %d workers, handler %s", self.owner, self.workers, self.settings.workers.handler
        )
        self._guard(
            "fork server start", lambda: forkserver.ensure_running()
        )  # pay the preload once, up front
        try:
            while not self._stop.is_set():
                self.step()
                if once and not self.running and self._ledger_idle():
                    break
                self._wait(TICK_S if self.running else self.settings.workers.poll_s)
        finally:
            self._shutdown()

    def _wait(self, timeout_s: float) -> None:
        """Sleep until `timeout_s` passes or a child exits (so its slot is refilled at once)."""
        with self._lock:
            sentinels = [r.process.sentinel for r in self.running.values() if not r.killing]
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout_s)
        else:
            self._stop.wait(timeout_s)

    def step(self) -> None:
        """One turn of the loop; every part degrades on its own when its dependency fails."""
        self.settings = self.config.current()
        self._guard("intake", self._poll_intakes)
        self._guard("reap", self._reap_children)
        self._guard("heartbeat", self._heartbeat)
        self._guard("kill requests", self._honour_kill_requests)
        self._guard("claim", self._claim_and_start)
        self._guard("supervisor check", self._check_supervisor)
        self._guard("audit checkpoint", self._checkpoint)

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # the database or an intake is down: keep running, try again next turn
            log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)

    # --- parts of a turn -----------------------------------------------------------
    def _poll_intakes(self) -> None:
        for intake in self.intakes:
            self._guard(f"intake {intake.name}", intake.poll)

    def _claim_and_start(self) -> None:
        while len(self.running) < self.workers and not self._stop.is_set():
            claim = jobs.claim_next_job(
                self.engine, self.owner, lease_s=self.settings.db.lease_s, host=self.host, clock=self.clock
            )
            if claim is None:
                return
            self._start_child(claim)

    def _start_child(self, claim: jobs.Claim) -> None:
        t0 = time.perf_counter()
        process = self._mp.Process(
            target=child.run_child,
            args=(self.settings, claim.__dict__.copy()),
            name=f"crewguard-job-{claim.job_id}",
            daemon=False,
        )
        process.start()
        assert process.pid is not None
        # killpg(pid) misses a child that has not called setpgid yet: record the group once it exists.
        _wait_for_group_leader(process.pid)
        self.stats.child_start_s.append(time.perf_counter() - t0)
        self.stats.started += 1
        with self._lock:
            self.running[claim.job_id] = RunningJob(claim, process, self.clock.now())
        try:
            jobs.record_child(self.engine, claim, pid=process.pid, pgid=process.pid, host=self.host)
        except jobs.LeaseLost:
            pass  # the reaper sees the child's outcome

    def _reap_children(self) -> None:
        with self._lock:
            done = [r for r in self.running.values() if not r.killing and r.process.exitcode is not None]
        for r in done:
            code = r.process.exitcode
            with self._lock:
                self.running.pop(r.claim.job_id, None)
            r.process.close()
            if code == child.EXIT_DONE:
                self.stats.finished += 1
                continue
            if code == child.EXIT_LEASE_LOST:
                self.stats.lease_lost += 1
                continue
            self.stats.crashed += 1
            try:
                jobs.fail_attempt(
                    self.engine,
                    r.claim,
                    error=f"worker process exited with code {code}",
                    retryable=True,
                    policy=job_retry_policy(self.settings),
                    clock=self.clock,
                )
            except jobs.LeaseLost:
                pass

    def _heartbeat(self) -> None:
        now = self.clock.now()
        if now - self._last_heartbeat < self.settings.db.heartbeat_s:
            return
        self._last_heartbeat = now
        with self._lock:
            claims = [r.claim for r in self.running.values()]
        lost = jobs.renew_leases(
            self.engine, self.owner, claims, lease_s=self.settings.db.lease_s, clock=self.clock
        )
        for claim in lost:  # someone else owns it now: stop our zombie copy, record nothing
            r = self.running.get(claim.job_id)
            if r is not None and r.process.pid:
                procgroup.signal_group(r.process.pid, signal.SIGKILL)
        with db.write(self.engine) as conn:
            heartbeats.beat(conn, heartbeats.crew_component(self.owner), now, {"running": len(claims)})

    def _honour_kill_requests(self) -> None:
        if not self.running:
            return
        for req in jobs.kill_requests_for(self.engine, self.owner):
            r = self.running.get(req.job_id)
            if r is None or r.killing or r.claim.attempt != req.attempt:
                continue
            r.killing = True
            threading.Thread(
                target=self._kill_and_record, args=(r, req.reason, req.incident_id), daemon=True
            ).start()

    def _kill_and_record(self, r: RunningJob, reason: str, incident_id: int | None) -> None:
        pid = r.process.pid
        signals = procgroup.kill_group(pid, self.settings.workers.kill_grace_s) if pid else []
        r.process.join(timeout=5)
        try:
            jobs.finish_killed(self.engine, r.claim, reason=reason, incident_id=incident_id, clock=self.clock)
            self.stats.killed += 1
            log.warning("job %s killed (%s): %s", r.claim.job_id, "+".join(signals) or "already gone", reason)
        except jobs.LeaseLost:
            pass  # it finished on its own before the signal landed
        except Exception as exc:
            log.error("recording kill of job %s failed: %s", r.claim.job_id, exc)
        finally:
            with self._lock:
                self.running.pop(r.claim.job_id, None)

    def _check_supervisor(self) -> None:
        now = self.clock.now()
        if now - self._last_supervisor_check < SUPERVISOR_CHECK_S:
            return
        self._last_supervisor_check = now
        with db.read(self.engine) as conn:
            seen = heartbeats.last_seen(conn, heartbeats.SUPERVISOR)
        stale = seen is not None and now - seen > self.settings.supervisor.heartbeat_timeout_s
        if stale and not self._supervisor_warned:
            self._supervisor_warned = True
            log.warning(
                "the supervisor has not been seen for %.0f s: runaway runs are not being watched", now - seen
            )
            from crewguard.crew import paging

            with db.write(self.engine) as conn:
                paging.notify_manager(
                    conn,
                    text=f"crewguard supervisor down: no heartbeat for {now - seen:.0f} s",
                    settings=self.settings,
                )
        elif seen is not None and not stale:
            self._supervisor_warned = False

    def _checkpoint(self, *, force: bool = False) -> None:
        now = self.clock.now()
        if not force and now - self._last_checkpoint < CHECKPOINT_S:
            return
        self._last_checkpoint = now
        try:
            audit.maybe_checkpoint(
                self.engine,
                key_path=self.settings.audit_key_path,
                checkpoint_dir=self.settings.checkpoint_dir,
                every=1 if force else self.settings.audit.checkpoint_every,
                clock=self.clock,
            )
        except audit.AuditIntegrityError as exc:  # never sign a broken chain; tell a human
            log.error("audit log integrity check failed: %s", exc)
            from crewguard.crew import paging

            with db.write(self.engine) as conn:
                paging.notify_manager(
                    conn, text=f"crewguard audit log integrity check FAILED: {exc}", settings=self.settings
                )

    def _ledger_idle(self) -> bool:
        with db.read(self.engine) as conn:
            busy = conn.execute(
                select(func.count()).where(jobs_table.c.state.in_((JOB_QUEUED, JOB_RUNNING)))
            ).scalar_one()
        return busy == 0

    def _shutdown(self) -> None:
        """Stop children; their jobs go back to the queue as failed attempts."""
        for _ in range(50):  # let kills in progress finish recording
            if not any(r.killing for r in self.running.values()):
                break
            time.sleep(0.1)
        for r in list(self.running.values()):
            if r.process.pid and r.process.exitcode is None:
                procgroup.kill_group(r.process.pid, self.settings.workers.kill_grace_s)
        self._reap_children()
        with self._lock:
            self.running.clear()
        self._guard("audit checkpoint", lambda: self._checkpoint(force=True))
        self.engine.dispose()
