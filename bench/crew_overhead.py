"""crewguard's per-email overhead around a CrewAI kickoff, as a ratio to a bare kickoff of the same crew.

Against the scenario LLM with zero latency (so CrewAI's and crewguard's own work is all there is),
interleaved in one run so that machine load hits every variant alike:

  bare        build_crew(settings, email).kickoff() in this process
  inproc-on   the whole flow in this process: ledger claim + process_email (load, tracing with the
              local feed, LLM classification, audit entries, ticket, tracing shutdown)
  inproc-off  the same with tracing off (tracing.local_feed false, no Langfuse)
  daemon-on   the crew daemon as deployed, 1 worker, one child process per email: per email
              from `job.claimed` to `email.ticketed` in the audit log (child start included), and
              the steady-state period between two emails' completions (daemon loop included)
  daemon-off  the same with tracing off

Run: python bench/crew_overhead.py [--rounds 3 --per-round 10]   (N = rounds x per-round per variant)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

for _key, _value in (("CREWAI_DISABLE_TELEMETRY", "true"), ("CREWAI_TRACING_ENABLED", "false"),
                     ("CREWAI_DISABLE_VERSION_CHECK", "true")):  # fmt: skip
    os.environ.setdefault(_key, _value)

import logging  # noqa: E402

import sqlalchemy as sa  # noqa: E402

from crewguard.agents.crew_factory import build_crew  # noqa: E402
from crewguard.agents.email import EmailForTriage  # noqa: E402
from crewguard.crew.flow.context import JobContext  # noqa: E402
from crewguard.crew.flow.triage import process_email  # noqa: E402
from crewguard.crew.intake.receive import receive_email  # noqa: E402
from crewguard.crew.ledger import db, jobs  # noqa: E402
from crewguard.crew.ledger.schema import audit_log  # noqa: E402
from crewguard.crew.ledger.schema import emails as emails_table  # noqa: E402
from crewguard.crew.workers.daemon import CrewDaemon  # noqa: E402
from crewguard.llm_sim import ScenarioLLM  # noqa: E402
from crewguard.settings import Settings, load_settings  # noqa: E402

#: Rounds of the interleaving, and emails per variant in each round (N = rounds x per_round).
DEFAULT_ROUNDS = 3
DEFAULT_PER_ROUND = 10
#: Lease of the bench's own in-process claims (no heartbeat renews them).
LEASE_S = 600.0
#: Support emails the crew triages (subject, body); a unique reference is appended to each.
EMAILS = [
    ("Refund for invoice 42", "I was charged twice for invoice 42, please refund the second charge."),
    ("Dashboard down", "Our dashboard is down and every page shows an error since this morning."),
    ("Locked out", "I cannot log in: my password reset link never arrives."),
    ("Upgrade quote", "We want 40 more seats on the enterprise plan; can you send a quote?"),
    ("Webhook 401", "Our webhook integration gets 401 from your API endpoint since yesterday."),
]


def bench_settings(data_dir: Path, base_url: str, *, tracing_on: bool) -> Settings:
    """The packaged configuration, pointed at the scenario LLM, with the local feed on or off."""
    base = load_settings(None)
    return load_settings(
        None,
        data_dir=str(data_dir),
        llm=base.llm.model_dump() | {"base_url": base_url, "timeout_s": 30},
        tracing=base.tracing.model_dump()
        | {"local_feed": tracing_on, "langfuse": base.tracing.langfuse.model_dump() | {"enabled": False}},
        workers=base.workers.model_dump() | {"count": 1, "handler": "crew"},
    )


class Emails:
    """Distinct emails (the scenario LLM and the ledger key both need them distinct)."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> tuple[str, str, str]:
        subject, body = EMAILS[self.n % len(EMAILS)]
        self.n += 1
        return subject, body, uuid.uuid4().hex

    @staticmethod
    def raw(subject: str, body: str, ref: str) -> bytes:
        return (
            f"From: Ann Customer <ann@acme.example>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{ref}@acme.example>\r\n\r\n{body}\r\n\r\nRef: {ref}\r\n"
        ).encode()


def bare(settings: Settings, emails: Emails) -> float:
    subject, body, ref = emails.next()
    email = EmailForTriage(ref, "ann@acme.example", subject, f"{body}\n\nRef: {ref}")
    t0 = time.perf_counter()
    build_crew(settings, email).kickoff()
    return time.perf_counter() - t0


def inproc(engine: sa.Engine, settings: Settings, emails: Emails) -> float:
    received = receive_email(
        engine, Emails.raw(*emails.next()), source="file", source_ref=None, settings=settings
    )
    t0 = time.perf_counter()
    claim = jobs.claim_next_job(engine, "bench-inproc", lease_s=LEASE_S)
    assert claim is not None and claim.email_key == received.key
    process_email(JobContext(engine, settings, claim))
    elapsed = time.perf_counter() - t0
    with db.read(engine) as conn:
        state = conn.execute(
            sa.select(emails_table.c.state).where(emails_table.c.key == received.key)
        ).scalar()
    assert state == "ticketed", state
    return elapsed


def daemon_batch(
    engine: sa.Engine, settings: Settings, emails: Emails, n: int
) -> tuple[list[float], list[float]]:
    """n emails through a 1-worker daemon: (claim -> ticketed per email, completion-to-completion periods)."""
    keys = []
    for _ in range(n):
        received = receive_email(
            engine, Emails.raw(*emails.next()), source="file", source_ref=None, settings=settings
        )
        keys.append(received.key)
    with db.read(engine) as conn:
        first_seq = conn.execute(sa.select(sa.func.max(audit_log.c.seq))).scalar() or 0
    CrewDaemon(settings, engine=engine, workers=1).run(once=True)
    engine = db.open_engine(settings.db_url)  # the daemon disposes of the engine it was given
    with db.read(engine) as conn:
        bodies = [json.loads(b) for b in conn.execute(sa.select(audit_log.c.body).where(audit_log.c.seq > first_seq).order_by(audit_log.c.seq)).scalars()]  # fmt: skip
    claimed = {b["email_key"]: b["ts"] for b in bodies if b["event"] == "job.claimed"}
    done = {b["email_key"]: b["ts"] for b in bodies if b["event"] == "email.ticketed"}
    missing = [k for k in keys if k not in done]
    assert not missing, f"{len(missing)} emails not ticketed by the daemon"
    latencies = [done[k] - claimed[k] for k in keys]
    ends = sorted(done[k] for k in keys)
    return latencies, [b - a for a, b in zip(ends, ends[1:], strict=False)]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaving rounds")
    parser.add_argument(
        "--per-round", type=int, default=DEFAULT_PER_ROUND, help="emails per variant per round"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("crewai", "crewai.llms.base_llm", "crewai.flow.runtime", "openinference", "root"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    results: dict[str, list[float]] = {
        k: [] for k in ("bare", "inproc-on", "inproc-off", "daemon-on", "daemon-off")
    }
    periods: dict[str, list[float]] = {"daemon-on": [], "daemon-off": []}
    with tempfile.TemporaryDirectory() as tmp, ScenarioLLM(port=0) as sim:
        on = bench_settings(Path(tmp), sim.base_url, tracing_on=True)
        off = bench_settings(Path(tmp), sim.base_url, tracing_on=False)
        engine = db.open_engine(on.db_url)
        emails = Emails()
        # warm-up: imports, first crew, the fork server's preload (none of it is counted)
        bare(on, emails), inproc(engine, on, emails), inproc(engine, off, emails)
        daemon_batch(engine, on, emails, 1)
        engine = db.open_engine(on.db_url)
        calls_before = sim.calls()
        steps: list[tuple[str, Callable[[], float]]] = [
            ("bare", lambda: bare(on, emails)),
            ("inproc-on", lambda: inproc(engine, on, emails)),
            ("inproc-off", lambda: inproc(engine, off, emails)),
        ]
        started = time.perf_counter()
        for r in range(args.rounds):
            for i in range(args.per_round):
                order = steps[i % 3 :] + steps[: i % 3]  # rotate who goes first
                for name, step in order:
                    results[name].append(step())
            daemons = [("daemon-on", on), ("daemon-off", off)]
            for name, settings in daemons if r % 2 == 0 else daemons[::-1]:
                latencies, gaps = daemon_batch(engine, settings, emails, args.per_round)
                engine = db.open_engine(on.db_url)
                results[name] += latencies
                periods[name] += gaps
            print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)
        total = sum(len(v) for v in results.values())
        calls = (sim.calls() - calls_before) / total
        engine.dispose()

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nLLM: scenario LLM on loopback, zero latency; {calls:.1f} chat requests per email")
    print(f"{'variant':<12} {'N':>4} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'ratio to bare':>14}")
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"{name:<12} {len(ms):>4} {statistics.median(ms):>10.0f} {pct(ms, 90):>8.0f} {min(ms):>8.0f} "
              f"{med[name] / med['bare']:>13.2f}x")  # fmt: skip
    for name, gaps in periods.items():
        if gaps:
            print(f"{name:<12} steady period between completions: median {statistics.median(gaps) * 1000:.0f} ms "
                  f"({statistics.median(gaps) / med['bare']:.2f}x bare), n={len(gaps)}")  # fmt: skip
    print(f"\ntracing on/off, in-process: {med['inproc-on'] / med['inproc-off']:.2f}x "
          f"({(med['inproc-on'] - med['inproc-off']) * 1000:+.0f} ms per email)")  # fmt: skip
    print(f"tracing on/off, daemon:     {med['daemon-on'] / med['daemon-off']:.2f}x "
          f"({(med['daemon-on'] - med['daemon-off']) * 1000:+.0f} ms per email)")  # fmt: skip
    print(f"crewguard in-process over bare: {(med['inproc-on'] - med['bare']) * 1000:+.0f} ms per email; "
          f"daemon over bare: {(med['daemon-on'] - med['bare']) * 1000:+.0f} ms per email")  # fmt: skip


if __name__ == "__main__":
    main()
