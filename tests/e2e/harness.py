"""The end-to-end harness: the crew daemon and the supervisor as two real processes, real CrewAI
against the scenario LLM over HTTP, pages to the Slack stand-in through slack-sdk, one SQLite ledger.

`start_system(root, overrides)` writes a crewguard.yaml (the packaged one plus the overrides) and
returns a `System`; `System.start_both()` starts `crewguard supervisor run` then `crewguard crew run`
in their own sessions; `System.close()` stops them and kills their process groups (and any job
process group still alive) for sure. Used by tests/e2e and bench/detection_latency.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, select

from crewguard.crew.intake.receive import receive_email
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import audit_log, emails, jobs, review_items, runs, trace_events
from crewguard.llm_sim import ScenarioLLM
from crewguard.settings import PACKAGED_CONFIG_DIR, Settings, load_settings
from crewguard.standins.slack import DEFAULT_TOKEN, SlackStandin

#: Seconds the scenario LLM takes per answer: runs stay in flight long enough to be watched.
LLM_LATENCY_S = 0.3
#: How long a process gets to stop after SIGTERM before its group is SIGKILLed.
STOP_TIMEOUT_S = 15.0
#: How long the supervisor may take to write its first heartbeat (imports on a busy 2-core machine).
READY_TIMEOUT_S = 60.0
#: Poll period of `wait_until`.
POLL_S = 0.2

#: Settings every end-to-end system gets (tests add their own on top).
BASE_OVERRIDES: dict[str, Any] = {
    "workers": {"count": 2, "kill_grace_s": 1.0},
    "llm": {"timeout_s": 60, "max_attempts": 2, "backoff_base_s": 0.2, "backoff_cap_s": 1.0},
    # Large in-process budgets: it is the SUPERVISOR that must stop runaway runs here.
    "budgets": {"max_llm_calls": 50, "max_tokens": 2_000_000, "max_wall_s": 300, "max_cost_usd": 100.0},
    "tracing": {"local_feed": True, "langfuse": {"enabled": False}},
    "supervisor": {
        "source": "local",
        "scan_interval_s": 0.25,  # a loop is stopped while the call in flight runs
        "page_interval_s": 0.5,
        "detectors": {"stall": {"call_s": 5, "no_progress_s": 30}},
    },
}

#: The bundled sample mailbox: well-behaved emails the crew tickets through the LLM.
MAILBOX = PACKAGED_CONFIG_DIR.parent / "crewguard" / "demo" / "mailbox"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def make_email(tag: str, subject: str, body: str, sender: str = "pat.customer@example.com") -> bytes:
    """A plain RFC 5322 message with a unique Message-ID."""
    return (
        f"Message-ID: <{tag}.{uuid.uuid4().hex[:10]}@e2e.example>\r\n"
        f"From: Pat Customer <{sender}>\r\nTo: support@acme-helpdesk.example\r\n"
        f"Subject: {subject}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def normal_emails(n: int) -> list[bytes]:
    """`n` well-behaved emails from the bundled mailbox (numbered 01..29, no [[sim:]] marker)."""
    files = sorted(p for p in MAILBOX.glob("*.eml") if int(p.name[:2]) <= 29)
    return [files[i % len(files)].read_bytes() for i in range(n)]


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


@dataclass
class System:
    """A running crewguard: its config, ledger, LLM, Slack and two daemon processes."""

    root: Path
    config_file: Path
    settings: Settings
    engine: Engine
    llm: ScenarioLLM
    slack: SlackStandin
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- processes -------------------------------------------------------------------------
    def start(self, name: str) -> None:
        """Start `crewguard crew run --workers 2` or `crewguard supervisor run` in its own session."""
        args = ["crew", "run", "--workers", "2"] if name == "crew" else ["supervisor", "run"]
        command = [sys.executable, "-m", "crewguard.cli", "--config", str(self.config_file), *args]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()

    def start_both(self) -> None:
        """Supervisor first (it must be watching before the first run starts), then the crew."""
        self.start("supervisor")
        wait_until(self.supervisor_beat, READY_TIMEOUT_S, "the supervisor's first heartbeat")
        self.start("crew")

    def supervisor_beat(self) -> bool:
        from crewguard.crew.ledger.queries import status_snapshot

        self.check_alive()
        return status_snapshot(self.engine)["supervisor"] is not None

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM both daemons, then SIGKILL whatever is left of their groups and of job groups."""
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # the fork server and anything else in the session
            proc.wait(timeout=10)
        with db.read(self.engine) as conn:
            pgids = conn.execute(select(jobs.c.pgid).where(jobs.c.pgid.is_not(None))).scalars().all()
        for pgid in pgids:  # job children lead their own groups, started by our crew daemon
            _signal_group(pgid, signal.SIGKILL)

    def close(self) -> None:
        """Stop everything this System started, whatever state it is in."""
        try:
            self.stop()
        finally:
            self.engine.dispose()
            self.slack.stop()
            self.llm.stop()

    # --- input -----------------------------------------------------------------------------
    def enqueue(self, raws: list[bytes]) -> list[str]:
        keys = []
        for raw in raws:
            result = receive_email(self.engine, raw, source="file", source_ref=None, settings=self.settings)
            assert result.key is not None and not result.duplicate and result.parse_error is None
            keys.append(result.key)
        return keys

    # --- reading the outcome ---------------------------------------------------------------
    def cli_json(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "crewguard.cli", "--config", str(self.config_file), *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        return json.loads(out)

    def email_states(self, keys: list[str]) -> dict[str, str]:
        with db.read(self.engine) as conn:
            rows = conn.execute(select(emails.c.key, emails.c.state).where(emails.c.key.in_(keys))).all()
        return dict(rows)

    def all_final(self, keys: list[str]) -> bool:
        self.check_alive()
        states = self.email_states(keys)
        return len(states) == len(keys) and all(s in ("ticketed", "in_review") for s in states.values())

    def review_items(self, email_key: str) -> list[dict[str, Any]]:
        with db.read(self.engine) as conn:
            rows = conn.execute(select(review_items).where(review_items.c.email_key == email_key)).all()
        return [dict(r._mapping) for r in rows]

    def runs_of(self, email_key: str) -> list[dict[str, Any]]:
        with db.read(self.engine) as conn:
            rows = conn.execute(select(runs).where(runs.c.email_key == email_key).order_by(runs.c.attempt))
            return [dict(r._mapping) for r in rows]

    def audit_events(self, event: str | None = None) -> list[dict[str, Any]]:
        with db.read(self.engine) as conn:
            bodies = conn.execute(select(audit_log.c.body).order_by(audit_log.c.seq)).scalars().all()
        entries = [json.loads(b) for b in bodies]
        return [e for e in entries if event is None or e.get("event") == event]

    def trace_rows(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        stmt = select(trace_events).where(trace_events.c.run_id == run_id).order_by(trace_events.c.id)
        if kind is not None:
            stmt = stmt.where(trace_events.c.kind == kind)
        with db.read(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def pages_drained(self) -> bool:
        from crewguard.crew.paging import pending_pages

        self.check_alive()
        return not pending_pages(self.engine)

    def incidents(self) -> list[dict[str, Any]]:
        return self.cli_json("incidents", "list")

    def slack_messages_for(self, incident_id: int) -> list[Any]:
        """Top-level Slack messages that name this incident (its one message, updated in place)."""
        tag = f"incident #{incident_id} "
        return [m for m in self.slack.top_level() if tag in m.text or any(tag in h for h in m.history)]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_config(root: Path, llm_url: str, slack_url: str, overrides: dict[str, Any]) -> Path:
    config = yaml.safe_load((PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text(encoding="utf-8"))
    config = deep_merge(config, BASE_OVERRIDES)
    config = deep_merge(config, overrides)
    config["data_dir"] = str(root / "data")
    config["config_dir"] = str(PACKAGED_CONFIG_DIR)
    config.setdefault("db", {}).pop("url", None)
    config["llm"]["base_url"] = llm_url
    config.setdefault("notify", {}).setdefault("slack", {})["base_url"] = slack_url
    path = root / "crewguard.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def system_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREWGUARD_", "LANGFUSE_"))}
    env |= {
        "CREWAI_DISABLE_TELEMETRY": "true",
        "CREWAI_TRACING_ENABLED": "false",
        "CREWAI_DISABLE_VERSION_CHECK": "true",
        "OPENAI_API_KEY": "sk-e2e-not-a-real-key",
        "SLACK_BOT_TOKEN": DEFAULT_TOKEN,
    }
    return env | (extra or {})


def start_system(
    root: Path,
    overrides: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    latency_s: float = LLM_LATENCY_S,
) -> System:
    """A System in `root` with its own scenario LLM and Slack stand-in (daemons not started yet).

    overrides: merged into the config; env: extra variables for both daemons; latency_s: per LLM answer.
    """
    root.mkdir(parents=True, exist_ok=True)
    llm = ScenarioLLM(port=0, latency_s=latency_s).start()
    slack = SlackStandin(port=0).start()
    config_file = write_config(root, llm.base_url, slack.base_url, overrides or {})
    settings = load_settings(config_file)
    return System(
        root=root,
        config_file=config_file,
        settings=settings,
        engine=db.open_engine(settings.db_url),
        llm=llm,
        slack=slack,
        env=system_env(env),
    )
