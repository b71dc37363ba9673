"""Process-level entry points: `crewguard crew run` and `crewguard up` (crew + supervisor)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from crewguard.crew.workers.daemon import CrewDaemon, Intake
from crewguard.settings import Settings

log = logging.getLogger("crewguard.up")

#: `crewguard up` restarts a process that died, but not faster than this.
RESTART_BACKOFF_S = 2.0


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "openai", "LiteLLM", "crewai", "opentelemetry", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_intakes(settings: Settings, engine) -> list[Intake]:  # type: ignore[no-untyped-def]
    """The configured intakes besides `crewguard intake add`: maildir, IMAP, RabbitMQ."""
    intakes: list[Intake] = []
    if settings.intake.maildir.path:
        from crewguard.crew.intake.maildir import MaildirWatcher

        intakes.append(MaildirWatcher(engine, settings))
    if settings.intake.imap.enabled:
        from crewguard.crew.intake.imap import ImapIntake

        intakes.append(ImapIntake(engine, settings))
    if settings.intake.rabbitmq.enabled:
        from crewguard.crew.intake.rabbitmq import RabbitIntake

        intakes.append(RabbitIntake(engine, settings))
    return intakes


def run_crew_daemon(
    settings: Settings, *, once: bool = False, workers: int | None = None, config_path: str | None = None
) -> CrewDaemon:
    configure_logging()
    daemon = CrewDaemon(settings, workers=workers, config_path=config_path)
    daemon.intakes = build_intakes(settings, daemon.engine)
    daemon.install_signal_handlers()
    daemon.run(once=once)
    return daemon


def run_up(config_file: str, *, workers: int | None = None) -> int:
    """Run the crew daemon and the supervisor as two processes; restart either if it dies."""
    configure_logging()
    base = [sys.executable, "-m", "crewguard.cli", "--config", config_file]
    commands = {
        "crew": [*base, "crew", "run", *(["--workers", str(workers)] if workers else [])],
        "supervisor": [*base, "supervisor", "run"],
    }
    procs = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping:
        for name, proc in list(procs.items()):
            if proc.poll() is not None:
                log.error("%s exited with %s; restarting in %.0f s", name, proc.returncode, RESTART_BACKOFF_S)
                time.sleep(RESTART_BACKOFF_S)
                procs[name] = subprocess.Popen(commands[name])
        time.sleep(0.5)
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0
