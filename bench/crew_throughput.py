"""Crew daemon throughput with N workers when every LLM call takes 1 s, against the ideal.

The scenario LLM answers every chat request after `--latency` seconds (normal scenario). For each
worker count a fresh SQLite ledger gets `--waves` x N emails and the crew daemon (`crew` handler,
one child process per email) works them off with `run(once=True)`. The ideal rate is
N / (LLM calls per email x latency): N emails in flight, each waiting only on its model calls.
Calls per email are counted from the scenario LLM's request log.

    wall s     first `job.claimed` -> last `email.ticketed` (audit log timestamps)
    daemon s   the whole `run(once=True)`, start-up and shutdown included
    latency    median claim -> ticketed of one email

Run: python bench/crew_throughput.py [--workers 1 2 4 8] [--waves 3] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

for _key, _value in (("CREWAI_DISABLE_TELEMETRY", "true"), ("CREWAI_TRACING_ENABLED", "false"),
                     ("CREWAI_DISABLE_VERSION_CHECK", "true")):  # fmt: skip
    os.environ.setdefault(_key, _value)

import sqlalchemy as sa  # noqa: E402

from crewguard.crew.intake.receive import receive_email  # noqa: E402
from crewguard.crew.ledger import db  # noqa: E402
from crewguard.crew.ledger.schema import audit_log  # noqa: E402
from crewguard.crew.workers.daemon import CrewDaemon  # noqa: E402
from crewguard.llm_sim import ScenarioLLM  # noqa: E402
from crewguard.settings import Settings, load_settings  # noqa: E402

#: Worker counts measured by default.
DEFAULT_WORKERS = (1, 2, 4, 8)
#: Emails per worker in each measurement (every worker gets this many in turn).
DEFAULT_WAVES = 4
#: Seconds the scenario LLM waits before every answer.
DEFAULT_LATENCY_S = 1.0
#: Support emails (subject, body); a unique reference is appended to each.
EMAILS = [
    ("Refund for invoice 42", "I was charged twice for invoice 42, please refund the second charge."),
    ("Dashboard down", "Our dashboard is down and every page shows an error since this morning."),
    ("Locked out", "I cannot log in: my password reset link never arrives."),
    ("Upgrade quote", "We want 40 more seats on the enterprise plan; can you send a quote?"),
]


def bench_settings(data_dir: Path, base_url: str, workers: int) -> Settings:
    base = load_settings(None)
    return load_settings(
        None,
        data_dir=str(data_dir),
        llm=base.llm.model_dump() | {"base_url": base_url, "timeout_s": 30},
        workers=base.workers.model_dump() | {"count": workers, "handler": "crew"},
    )


def raw_email(i: int) -> bytes:
    subject, body = EMAILS[i % len(EMAILS)]
    ref = uuid.uuid4().hex
    return (
        f"From: Ann Customer <ann@acme.example>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{ref}@acme.example>\r\n\r\n{body}\r\n\r\nRef: {ref}\r\n"
    ).encode()


def run_daemon(root: Path, sim: ScenarioLLM, workers: int, n_emails: int) -> dict[str, float]:
    """n_emails through a fresh ledger and a daemon with `workers` workers; figures of that run."""
    settings = bench_settings(root / f"w{workers}-{uuid.uuid4().hex[:6]}", sim.base_url, workers)
    engine = db.open_engine(settings.db_url)
    for i in range(n_emails):
        receive_email(engine, raw_email(i), source="file", source_ref=None, settings=settings)
    calls_before = sim.calls()
    t0 = time.perf_counter()
    CrewDaemon(settings, engine=engine, workers=workers).run(once=True)
    daemon_s = time.perf_counter() - t0
    calls = sim.calls() - calls_before
    engine = db.open_engine(settings.db_url)
    with db.read(engine) as conn:
        bodies = [json.loads(b) for b in conn.execute(sa.select(audit_log.c.body)).scalars()]
    engine.dispose()
    claimed = {b["email_key"]: b["ts"] for b in bodies if b["event"] == "job.claimed"}
    done = {b["email_key"]: b["ts"] for b in bodies if b["event"] == "email.ticketed"}
    if len(done) != n_emails:
        raise SystemExit(f"only {len(done)} of {n_emails} emails were ticketed with {workers} workers")
    wall = max(done.values()) - min(claimed.values())
    return {
        "emails": n_emails,
        "wall": wall,
        "daemon": daemon_s,
        "calls_per_email": calls / n_emails,
        "latency": statistics.median(done[k] - claimed[k] for k in done),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=list(DEFAULT_WORKERS))
    parser.add_argument("--waves", type=int, default=DEFAULT_WAVES, help="emails per worker")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY_S, help="seconds per LLM call")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ScenarioLLM(port=0, latency_s=args.latency) as sim:
        run_daemon(Path(tmp), sim, 1, 1)  # warm-up: the fork server's preload is paid once per host
        for workers in args.workers:
            rows.append((workers, run_daemon(Path(tmp), sim, workers, args.waves * workers)))
            print(f"{workers} workers done ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nscenario LLM latency {args.latency:g} s per call; {args.waves} emails per worker")
    print(f"{'workers':>7} {'emails':>6} {'wall s':>7} {'emails/s':>9} {'ideal':>7} {'efficiency':>10} "
          f"{'calls/email':>11} {'latency s':>9} {'daemon s':>8}")  # fmt: skip
    for workers, r in rows:
        rate = r["emails"] / r["wall"]
        ideal = workers / (r["calls_per_email"] * args.latency)
        print(f"{workers:>7} {r['emails']:>6.0f} {r['wall']:>7.1f} {rate:>9.3f} {ideal:>7.3f} {rate / ideal:>9.0%} "
              f"{r['calls_per_email']:>11.1f} {r['latency']:>9.2f} {r['daemon']:>8.1f}")  # fmt: skip
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
