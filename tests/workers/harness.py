"""Real crew daemons as subprocesses on a temporary ledger, and the /proc views the tests check.

`CrewHarness` writes one crewguard.yaml (ledger URL, short leases, test-double handler), enqueues
generated emails through the real intake, starts `python -m crewguard.cli crew run` processes
and, at teardown, kills every process group it started or saw in the ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, select

from crewguard.crew.intake.receive import receive_email
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import jobs as jobs_table
from crewguard.crew.ledger.schema import runs
from crewguard.settings import PACKAGED_CONFIG_DIR, Settings, load_settings

#: Ledger settings that make leases expire and retries come back within a test's patience.
FAST_DB: dict[str, Any] = {
    "lease_s": 3.0,
    "heartbeat_s": 0.5,
    "max_attempts": 3,
    "backoff_base_s": 0.2,
    "backoff_cap_s": 0.5,
}
#: Worker settings for tests: a cheap fork server (no crewai preload) and a short kill grace.
FAST_WORKERS: dict[str, Any] = {
    "count": 2,
    "handler": "echo",
    "kill_grace_s": 1.0,
    "poll_s": 0.1,
    "preload": ["crewguard.crew.ledger.jobs"],
}
#: How often wait_until polls.
POLL_S = 0.05


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test (not hang) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


# --- /proc ------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process, or None when it is gone (zombies count as gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) in process group `pgid`."""
    members = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[2] == pgid:
            members.append(pid)
    return members


def children_of(ppid: int) -> list[int]:
    return [pid for pid in all_pids() if (st := proc_stat(pid)) is not None and st[1] == ppid]


def is_job_child(pid: int) -> bool:
    """True for a live job child: forked by a multiprocessing fork server, leader of its own group."""
    st = proc_stat(pid)
    if st is None or st[2] != pid:
        return False
    try:
        return b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_group_quietly(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, signal.SIGCONT)  # a stopped group must run to die of SIGTERM; harmless otherwise
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- emails -------------------------------------------------------------------------------------

SUBJECTS = ("Invoice charged twice", "API returns 500", "Cannot log in", "Pricing for 40 seats", "Thanks!")


def make_email(n: int, tag: str) -> bytes:
    """A small, well-formed support email with a unique Message-ID."""
    subject = SUBJECTS[n % len(SUBJECTS)]
    return (
        f"From: Customer {n} <customer{n}@example.com>\r\n"
        f"To: support@example.com\r\n"
        f"Subject: {subject} #{n}\r\n"
        f"Message-ID: <{tag}-{n}@crewguard.test>\r\n"
        f"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"Hello, message {n}: {subject.lower()}.\r\n"
    ).encode()


# --- the harness ----------------------------------------------------------------------------------


class CrewHarness:
    """One temporary crewguard setup: config file, ledger, daemons started, pids to clean up."""

    def __init__(
        self,
        tmp_path: Path,
        ledger_url: str,
        *,
        db_settings: dict[str, Any] | None = None,
        worker_settings: dict[str, Any] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "crewguard.yaml"
        data = yaml.safe_load((PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text())
        data["data_dir"] = str(tmp_path / "data")
        data["db"] = {**data.get("db", {}), **FAST_DB, **(db_settings or {}), "url": ledger_url}
        data["workers"] = {**data.get("workers", {}), **FAST_WORKERS, **(worker_settings or {})}
        data["intake"] = {**data.get("intake", {}), "maildir": {"path": None}}
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.settings: Settings = load_settings(self.config_path)
        self.engine: Engine = db.open_engine(self.settings.db_url)
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.tag = f"t{os.getpid()}-{time.monotonic_ns()}"
        self.enqueued = 0

    # email intake through the real receive path
    def enqueue(self, count: int) -> list[str]:
        keys = []
        for n in range(self.enqueued, self.enqueued + count):
            result = receive_email(
                self.engine, make_email(n, self.tag), source="test", source_ref=None, settings=self.settings
            )
            assert result.ok and not result.duplicate and result.parse_error is None, result
            keys.append(result.key)
        self.enqueued += count
        return keys

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CREWGUARD_")}
        env |= {
            "CREWGUARD_CONFIG": str(self.config_path),
            "CREWAI_DISABLE_TELEMETRY": "true",
            "CREWAI_TRACING_ENABLED": "false",
            "CREWAI_DISABLE_VERSION_CHECK": "true",
        }
        return env | overrides

    def start_daemon(
        self, *, workers: int = 2, once: bool = False, handler: str | None = None
    ) -> subprocess.Popen[bytes]:
        """`crewguard crew run` in its own session (its pgid = its pid), stderr to a log file."""
        cmd = [sys.executable, "-m", "crewguard.cli", "crew", "run", "--workers", str(workers)]
        if once:
            cmd.append("--once")
        extra = {"CREWGUARD_WORKERS__HANDLER": handler} if handler else {}
        log_path = self.tmp_path / f"daemon-{len(self.daemons)}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd, env=self.env(**extra), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.daemons.append(proc)
        self.logs.append(log_path)
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[self.daemons.index(proc)].read_text(errors="replace")

    def job_rows(self) -> list[Any]:
        with db.read(self.engine) as conn:
            return list(conn.execute(select(jobs_table).order_by(jobs_table.c.id)))

    def running_children(self) -> list[Any]:
        """Running jobs whose child pid is recorded, with (job id, pid, owner, run id, email key)."""
        return [r for r in self.job_rows() if r.state == "running" and r.pid is not None]

    def recorded_child_pids(self) -> set[int]:
        with db.read(self.engine) as conn:
            return {pid for (pid,) in conn.execute(select(runs.c.pid).where(runs.c.pid.is_not(None)))}

    def leftover_children(self) -> list[int]:
        """Job children recorded in the ledger that are still alive."""
        return sorted(pid for pid in self.recorded_child_pids() if is_job_child(pid))

    def cleanup(self) -> None:
        """Kill every daemon's session and every job child group ever recorded; dispose the engine."""
        for proc in self.daemons:
            kill_group_quietly(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            pids = self.recorded_child_pids()
        except Exception:  # the ledger may be gone already; the daemons' groups are dead anyway
            pids = set()
        for pid in pids:
            if is_job_child(pid) or (proc_stat(pid) is None and group_members(pid)):
                kill_group_quietly(pid)  # a live job child, or what its dead group left behind
        self.engine.dispose()
