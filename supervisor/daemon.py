"""The supervisor daemon: APScheduler interval jobs for scans, page delivery and audit checkpoints.

Every job logs and carries on when a dependency fails (ledger locked, Langfuse down, Slack down):
the next tick tries again. SIGTERM / SIGINT stop the scheduler after the running job.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.settings import Settings
from crewguard.supervisor.scan import ScanReport, Supervisor
from crewguard.supervisor.sources import TraceSource

log = logging.getLogger(__name__)

#: Seconds between attempts to write a signed audit checkpoint.
CHECKPOINT_INTERVAL_S = 30.0
#: A tick later than this (e.g. after a long scan) is still run once rather than skipped.
MISFIRE_GRACE_S = 30


def build_source(settings: Settings, engine: Engine, *, clock: Clock = SYSTEM_CLOCK) -> TraceSource:
    """The configured trace source: the local feed in the ledger (default) or Langfuse."""
    if settings.supervisor.source == "langfuse":
        from crewguard.supervisor.sources.langfuse import LangfuseSource

        return LangfuseSource(settings, clock=clock)
    from crewguard.supervisor.sources.local import LocalFeedSource

    return LocalFeedSource(engine, clock=clock)


class SupervisorDaemon:
    """The scheduled jobs around one `Supervisor`; `run_once()` and `run_forever()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        source: TraceSource | None = None,
        clock: Clock = SYSTEM_CLOCK,
        pager: Any | None = None,
    ) -> None:
        """engine/source/pager: defaults from settings (tests inject their own)."""
        from crewguard.crew.ledger.db import open_engine
        from crewguard.crew.paging import Pager

        self.settings = settings
        self.engine = engine or open_engine(settings.db_url)
        self.supervisor = Supervisor(
            self.engine, settings, source or build_source(settings, self.engine, clock=clock), clock=clock
        )
        self.pager = pager or Pager(self.engine, settings, clock=clock)
        self.clock = clock
        self.last_report: ScanReport | None = None
        self._scheduler: Any = None

    # --- jobs (each one logs and returns on failure) --------------------------------
    def scan(self) -> ScanReport | None:
        try:
            report = self.supervisor.scan_once()
        except Exception as exc:
            log.warning("supervisor scan failed (%s); next scan retries", _describe(exc))
            return None
        self.last_report = report
        if report.opened or report.killed_here or report.resolved:
            log.info(
                "scan: %d runs, %d observations, opened %s, kills requested %s, killed here %s, resolved %s",
                report.active_runs,
                report.observations,
                report.opened,
                report.kill_requested,
                report.killed_here,
                report.resolved,
            )
        return report

    def deliver_pages(self) -> int:
        try:
            return self.pager.deliver_pending()
        except Exception as exc:
            log.warning("page delivery failed (%s); pages stay in the outbox", _describe(exc))
            return 0

    def checkpoint(self) -> None:
        from crewguard.crew.ledger import audit

        maybe_checkpoint: Callable[..., Any] | None = getattr(audit, "maybe_checkpoint", None)
        if maybe_checkpoint is None:
            return
        try:
            maybe_checkpoint(
                self.engine,
                key_path=self.settings.audit_key_path,
                checkpoint_dir=self.settings.checkpoint_dir,
                every=self.settings.audit.checkpoint_every,
                clock=self.clock,
            )
        except Exception as exc:
            log.warning("audit checkpoint failed (%s)", _describe(exc))

    # --- running ---------------------------------------------------------------------
    def run_once(self) -> ScanReport | None:
        """One scan and one page delivery (`crewguard supervisor run --once`)."""
        report = self.scan()
        self.deliver_pages()
        return report

    def run_forever(self, *, install_signals: bool = True) -> None:
        from apscheduler.schedulers.blocking import BlockingScheduler

        sup = self.settings.supervisor
        scheduler = BlockingScheduler(job_defaults={"max_instances": 1, "coalesce": True})
        now = datetime.now()
        common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": MISFIRE_GRACE_S}
        scheduler.add_job(
            self.scan, "interval", seconds=sup.scan_interval_s, next_run_time=now, id="scan", **common
        )
        scheduler.add_job(
            self.deliver_pages,
            "interval",
            seconds=sup.page_interval_s,
            next_run_time=now,
            id="pages",
            **common,
        )
        scheduler.add_job(
            self.checkpoint, "interval", seconds=CHECKPOINT_INTERVAL_S, id="checkpoint", **common
        )
        self._scheduler = scheduler
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        log.info("supervisor running: scan every %g s, source %s", sup.scan_interval_s, sup.source)
        scheduler.start()
        self.deliver_pages()  # flush what the last scan queued
        log.info("supervisor stopped")

    def stop(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("supervisor: signal %d, stopping", signum)
        self.stop()


def run_supervisor(settings: Settings, *, once: bool = False) -> int:
    """Entry point for `crewguard supervisor run [--once]`; returns the exit status."""
    daemon = SupervisorDaemon(settings)
    if once:
        daemon.run_once()
        return 0
    daemon.run_forever()
    return 0


def _describe(exc: BaseException) -> str:
    # Type and first line only: driver messages may quote SQL parameters or URLs with credentials.
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
