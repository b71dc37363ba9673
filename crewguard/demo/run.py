"""`crewguard demo`: the whole system on one machine, no network and no keys.

A data folder gets its own crewguard.yaml (SQLite ledger there, the in-process scenario LLM,
supervisor limits tuned for a short run); the bundled mailbox is enqueued; the supervisor runs
as its own process (as in production) while the crew daemon works until every email is final;
then the pending pages are delivered to the console and the summary is printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from crewguard.demo import report
from crewguard.settings import CONFIG_ENV, PACKAGED_CONFIG_DIR, Settings, load_settings

log = logging.getLogger("crewguard.demo")

#: The bundled sample mailbox.
MAILBOX_DIR = Path(__file__).with_name("mailbox")
#: Name of the demo's configuration file inside its data folder.
CONFIG_NAME = "crewguard.yaml"
#: Where the job processes' own output (CrewAI's console chatter, tracebacks) goes, in the data folder.
CREW_LOG_NAME = "crew-processes.log"
#: Seconds the scenario LLM takes per answer, like a real model, so the supervisor sees runs in flight.
DEMO_LLM_LATENCY_S = 0.4
#: Seconds between supervisor scans in the demo: a looping run is caught within a few of its calls.
DEMO_SCAN_INTERVAL_S = 0.5
#: Supervisor limit on one LLM call in flight: short, so the supervisor (not the LLM timeout) ends a hang.
DEMO_CALL_STALL_S = 8.0
#: Supervisor limit on a run without any progress: above a cold job process's start on a busy machine (~10 s).
DEMO_NO_PROGRESS_S = 30.0
#: Per-call LLM timeout in the demo: well above DEMO_CALL_STALL_S, so a hang is caught as a stall.
DEMO_LLM_TIMEOUT_S = 20.0
#: Seconds between supervisor page deliveries in the demo (pages appear soon after incidents).
DEMO_PAGE_INTERVAL_S = 1.0
#: How long the supervisor process may take to write its first heartbeat.
SUPERVISOR_READY_TIMEOUT_S = 90.0
#: How long to wait for the supervisor to deliver the pages still in the outbox at the end.
PAGE_DRAIN_TIMEOUT_S = 20.0
#: How long the supervisor may take to stop after SIGTERM before it is killed.
SUPERVISOR_STOP_TIMEOUT_S = 15.0
#: The crew daemon is stopped after this long, whatever is left (the demo then exits non-zero).
DEMO_DEADLINE_S = 600.0
#: Seconds between progress lines while the crew works.
PROGRESS_EVERY_S = 10.0
#: Loggers kept at WARNING so the demo's own output stays readable.
QUIET_LOGGERS = ("httpx", "openai", "LiteLLM", "litellm", "crewai", "opentelemetry", "urllib3", "apscheduler")
#: Environment variables the demo keeps away from itself and its processes: real Slack, a real LLM key.
PRIVATE_ENV = ("SLACK_BOT_TOKEN", "OPENAI_API_KEY")


def demo_config(data_dir: Path, llm_base_url: str, *, workers: int) -> dict[str, Any]:
    """The packaged crewguard.yaml with the demo's data folder, LLM and short supervisor limits."""
    config = yaml.safe_load((PACKAGED_CONFIG_DIR / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    config["data_dir"] = str(data_dir)
    config["config_dir"] = str(PACKAGED_CONFIG_DIR)  # agents.yaml and tasks.yaml
    config.setdefault("db", {}).pop("url", None)  # the embedded SQLite ledger in data_dir
    config.setdefault("workers", {})["count"] = workers
    config.setdefault("intake", {}).setdefault("maildir", {})["path"] = None
    llm = config.setdefault("llm", {})
    llm["base_url"] = llm_base_url
    llm["timeout_s"] = DEMO_LLM_TIMEOUT_S
    sinks = config.setdefault("sinks", {})
    sinks["primary"] = "helpdesk"
    sinks.setdefault("salesforce", {})["enabled"] = False
    tracing = config.setdefault("tracing", {})
    tracing["local_feed"] = True
    tracing.setdefault("langfuse", {})["enabled"] = False
    supervisor = config.setdefault("supervisor", {})
    supervisor["source"] = "local"
    supervisor["scan_interval_s"] = DEMO_SCAN_INTERVAL_S
    supervisor["page_interval_s"] = DEMO_PAGE_INTERVAL_S
    stall = supervisor.setdefault("detectors", {}).setdefault("stall", {})
    stall["no_progress_s"] = DEMO_NO_PROGRESS_S
    stall["call_s"] = DEMO_CALL_STALL_S
    return config


def write_demo_config(data_dir: Path, llm_base_url: str, *, workers: int) -> Path:
    path = data_dir / CONFIG_NAME
    header = "# Written by `crewguard demo`: the packaged configuration with the demo's ledger and LLM.\n"
    body = yaml.safe_dump(demo_config(data_dir, llm_base_url, workers=workers), sort_keys=False)
    path.write_text(header + body, encoding="utf-8")
    return path


@contextlib.contextmanager
def demo_environment(config_file: Path) -> Iterator[list[str]]:
    """CREWGUARD_CONFIG for the processes the demo starts; CREWGUARD_* overrides and secrets set aside.

    Yields the names of the variables set aside; everything is restored afterwards.
    """
    saved = {
        name: value
        for name, value in os.environ.items()
        if name in PRIVATE_ENV or (name.startswith("CREWGUARD_") and name != CONFIG_ENV)
    }
    previous_config = os.environ.get(CONFIG_ENV)
    for name in saved:
        del os.environ[name]
    os.environ[CONFIG_ENV] = str(config_file)
    try:
        yield sorted(saved)
    finally:
        os.environ.update(saved)
        if previous_config is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = previous_config


def configure_logging() -> None:
    """WARNING for everything, including the libraries; the demo prints its own progress."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def stdio_to(path: Path) -> Iterator[None]:
    """Point file descriptors 1 and 2 at `path` (appending) for the block, for processes started in it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (target, *saved):
            os.close(fd)


def start_fork_server(log_file: Path) -> None:
    """Start the crew's fork server with its output (and every job child's) going to `log_file`.

    Job children are forked from it and inherit its stdout/stderr; an already running fork
    server (a second demo in one process) keeps the output it has.
    """
    from multiprocessing import forkserver

    with stdio_to(log_file):
        forkserver.ensure_running()


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


# --- the supervisor process ---------------------------------------------------------------------------
def start_supervisor(config_file: Path) -> subprocess.Popen[bytes]:
    """`crewguard supervisor run` as its own process (pages go to its stderr, i.e. this console)."""
    command = [sys.executable, "-m", "crewguard.cli", "--config", str(config_file), "supervisor", "run"]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def wait_for_supervisor(engine: Any, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """True once the supervisor has written a heartbeat; False when it died or took too long."""
    from crewguard.crew.ledger.queries import status_snapshot

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if status_snapshot(engine)["supervisor"] is not None:
            return True
        time.sleep(0.5)
    return False


def drain_pages(engine: Any, process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait until the supervisor delivered the outbox; the number of pages still pending."""
    from crewguard.crew.paging import pending_pages

    deadline = time.monotonic() + timeout_s
    while True:
        left = len(pending_pages(engine))
        if left == 0 or process.poll() is not None or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- progress ----------------------------------------------------------------------------------------
def _progress(engine: Any, stop: threading.Event) -> None:
    from crewguard.crew.ledger.queries import status_snapshot

    while not stop.wait(PROGRESS_EVERY_S):
        try:
            e = status_snapshot(engine)["emails"]
        except Exception:  # the ledger is busy: skip this line
            continue
        done = e["ticketed"] + e["in_review"] + e["resolved"]
        _say(
            f"{done}/{e['total']} emails final (ticketed {e['ticketed']}, in review {e['in_review']}), "
            f"{e['running']} running, {e['queued']} queued"
        )


# --- the demo ----------------------------------------------------------------------------------------
def run_demo(
    *,
    workers: int = 2,
    data_dir: str | None = None,
    keep: bool = False,
    llm_base_url: str | None = None,
) -> int:
    """Run the demo; 0 when every email reached a final state and the audit log verifies.

    workers: concurrent jobs of the crew daemon
    data_dir: where the ledger, config and audit checkpoints go (default: a temporary folder)
    keep: keep the temporary folder (a given data_dir is always kept)
    llm_base_url: an OpenAI-compatible LLM instead of the built-in scenario LLM (e.g. a closed
        port, to watch every email take the keyword fallback)
    """
    configure_logging()
    started = time.monotonic()
    temporary = data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="crewguard-demo-") if temporary else data_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    sim = None
    try:
        if llm_base_url is None:
            from crewguard.llm_sim import ScenarioLLM

            sim = ScenarioLLM(port=0, latency_s=DEMO_LLM_LATENCY_S).start()
            llm_base_url = sim.base_url
        config_file = write_demo_config(folder, llm_base_url, workers=workers)
        with demo_environment(config_file) as set_aside:
            if set_aside:
                _say(f"ignoring {', '.join(set_aside)} for the demo (it runs on its own config and LLM)")
            explorable = not temporary or keep
            code = _run(load_settings(config_file), config_file, workers, sim, started, explorable)
        if not explorable:
            _say(f"removed {folder}: run with --keep or --data-dir to explore the ledger afterwards")
        return code
    finally:
        if sim is not None:
            sim.stop()
        if temporary and not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _run(
    settings: Settings, config_file: Path, workers: int, sim: Any, started: float, explorable: bool
) -> int:
    from crewguard.crew.intake.receive import receive_files
    from crewguard.crew.ledger import db
    from crewguard.crew.ledger.audit import format_result, verify_with_settings
    from crewguard.crew.workers.daemon import CrewDaemon

    expected = report.load_expected()
    engine = db.open_engine(settings.db_url)
    files = sorted(MAILBOX_DIR.glob("*.eml"))
    _say(f"ledger and config in {settings.data_path}")
    _say(f"LLM: {settings.llm.base_url}" + (" (built-in scenario LLM)" if sim is not None else ""))
    results = receive_files(engine, files, settings=settings)
    unreadable = [r for r in results if not r.ok]
    to_review = [r for r in results if r.ok and r.parse_error]
    _say(
        f"enqueued {len(results) - len(unreadable)} emails from {MAILBOX_DIR} "
        f"({len(to_review)} unparseable, straight to review)"
    )
    for r in unreadable:
        _say(f"could not read {r.source_ref}: {r.error}")

    supervisor = start_supervisor(config_file)
    try:
        if wait_for_supervisor(engine, supervisor, SUPERVISOR_READY_TIMEOUT_S):
            _say(f"supervisor running as process {supervisor.pid}")
        else:
            _say("WARNING: the supervisor did not start; runaway runs end only by their own limits")
        daemon = CrewDaemon(settings, engine=engine, workers=workers, config_path=str(config_file))
        crew_log = settings.data_path / CREW_LOG_NAME
        start_fork_server(crew_log)  # after CrewDaemon(): it sets the modules the fork server preloads
        _say(f"job processes write their own output to {crew_log}")
        _say(f"crew daemon working with {daemon.workers} workers (pages from the supervisor appear below)")
        stop_progress = threading.Event()
        progress = threading.Thread(target=_progress, args=(engine, stop_progress), daemon=True)
        deadline = threading.Timer(DEMO_DEADLINE_S, daemon.stop)
        deadline.daemon = True
        progress.start()
        deadline.start()
        try:
            daemon.run(once=True)
        finally:
            deadline.cancel()
            stop_progress.set()
        left = drain_pages(engine, supervisor, PAGE_DRAIN_TIMEOUT_S)
        if left:
            _say(f"{left} pages still in the outbox (delivered by the next supervisor run)")
    finally:
        stop_process(supervisor, SUPERVISOR_STOP_TIMEOUT_S)

    verified = verify_with_settings(settings)
    summary = report.collect(
        engine,
        audit_ok=verified.ok,
        audit_message=format_result(verified).split(": ", 1)[-1],
        llm_requests=len(sim.requests) if sim is not None else None,
        wall_s=time.monotonic() - started,
        expected=expected,
        compare=sim is not None,
    )
    engine.dispose()
    print(report.format_summary(summary, config_file=str(config_file) if explorable else None), flush=True)
    return 0 if summary.all_final and summary.audit_ok else 1
