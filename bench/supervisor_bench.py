"""Supervisor scan throughput with many active runs (synthetic ledger rows), on SQLite and PostgreSQL.

Usage: python bench/supervisor_bench.py [--runs 10000] [--spans 4] [--scans 5] [--engines sqlite,pg]
Prints, per engine: seeding time, the first scan (catch-up read of every active run's trace events),
and steady-state scans while new events arrive (observations per second, scan time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from crewguard.clock import FakeClock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.db import open_engine, scratch_schema
from crewguard.crew.ledger.schema import emails, heartbeats, jobs, runs, trace_events
from crewguard.settings import Settings
from crewguard.supervisor.scan import Supervisor
from crewguard.supervisor.sources.local import LocalFeedSource

#: The PostgreSQL the bench uses (a throwaway schema is created and dropped in it).
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Rows per bulk insert while seeding.
CHUNK = 5_000
OWNER = "bench-host:1"


def seed(engine, n_runs: int, spans_per_run: int, now: float) -> tuple[list[str], int]:
    run_ids = [str(uuid.uuid4()) for _ in range(n_runs)]
    events = []
    with db.write(engine) as conn:
        conn.execute(
            emails.insert(),
            [
                dict(key=f"{i:064x}", source="file", raw=b"x", size=1, raw_sha256="0" * 64, state="running",
                     received_at=now - 30, updated_at=now - 30)
                for i in range(n_runs)
            ],
        )  # fmt: skip
        conn.execute(
            jobs.insert(),
            [
                dict(id=i + 1, email_key=f"{i:064x}", state="running", attempts=1, max_attempts=3, available_at=now - 30,
                     lease_owner=OWNER, lease_expires_at=now + 3600, host="bench", run_id=rid,
                     created_at=now - 30, updated_at=now - 30)
                for i, rid in enumerate(run_ids)
            ],
        )  # fmt: skip
        conn.execute(
            runs.insert(),
            [
                dict(id=rid, job_id=i + 1, email_key=f"{i:064x}", attempt=1, worker=OWNER, started_at=now - 20,
                     last_progress_at=now - 1)
                for i, rid in enumerate(run_ids)
            ],
        )  # fmt: skip
        conn.execute(
            heartbeats.insert().values(component=f"crew:{OWNER}", host="bench", pid=1, at=now, info="{}")
        )
    for rid in run_ids:
        events.extend(span_rows(rid, spans_per_run, now - 15))
    for i in range(0, len(events), CHUNK):
        with db.write(engine) as conn:
            conn.execute(trace_events.insert(), events[i : i + CHUNK])
    return run_ids, len(events)


def span_rows(run_id: str, spans: int, t: float, *, offset: int = 0) -> list[dict]:
    rows = []
    for s in range(offset, offset + spans):
        sid = f"{s:016x}"
        if s % 2 == 0:
            kind, start_attrs = "LLM", {"model": "openai/gpt-4o-mini", "prompt_sha": f"{run_id[:8]}{s}"}
            end_attrs = {
                "model": "openai/gpt-4o-mini",
                "prompt_tokens": 800,
                "completion_tokens": 120,
                "total_tokens": 920,
            }
        else:
            kind, start_attrs = (
                "TOOL",
                {"tool": "search_knowledge_base", "args": json.dumps({"q": f"query {s}"})},
            )
            end_attrs = {"tool": "search_knowledge_base"}
        for phase, at, attrs in (("start", t + s, start_attrs), ("end", t + s + 0.5, end_attrs)):
            rows.append(dict(run_id=run_id, span_id=sid, phase=phase, kind=kind, name=kind.lower(), at=at,
                             attributes=json.dumps(attrs, sort_keys=True)))  # fmt: skip
    return rows


def bench_engine(label: str, url: str, args: argparse.Namespace) -> None:
    engine = open_engine(url)
    now = time.time()
    t0 = time.perf_counter()
    run_ids, n_events = seed(engine, args.runs, args.spans, now)
    seed_s = time.perf_counter() - t0
    clock = FakeClock(now)
    settings = Settings(data_dir=tempfile.mkdtemp(prefix="cg-bench-"))
    source = LocalFeedSource(engine, clock=clock)
    sup = Supervisor(engine, settings, source, clock=clock)
    t0 = time.perf_counter()
    first = sup.scan_once()
    first_s = time.perf_counter() - t0
    print(f"[{label}] seeded {args.runs} active runs, {n_events} trace events in {seed_s:.1f} s")
    print(
        f"[{label}] first scan (catch-up): {first_s:.2f} s, {first.observations} observations, "
        f"{first.observations / first_s:,.0f} obs/s, {len(first.findings)} findings"
    )
    steady, per_obs = [], []
    for k in range(args.scans):
        # Between scans, a tenth of the runs make one more call (start + end rows).
        batch = [
            r for rid in run_ids[k % 10 :: 10] for r in span_rows(rid, 1, now - 5, offset=args.spans + k)
        ]
        with db.write(engine) as conn:
            conn.execute(trace_events.insert(), batch)
        clock.advance(1)
        t0 = time.perf_counter()
        report = sup.scan_once()
        dt = time.perf_counter() - t0
        steady.append(dt)
        per_obs.append(report.observations / dt)
    print(
        f"[{label}] steady scan ({args.runs // 10} runs with new events each): median {statistics.median(steady):.2f} s, "
        f"max {max(steady):.2f} s, {statistics.median(per_obs):,.0f} obs/s evaluated, "
        f"findings {len(report.findings)}"
    )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000, help="active runs in the ledger")
    parser.add_argument("--spans", type=int, default=4, help="completed spans per run before the first scan")
    parser.add_argument("--scans", type=int, default=5, help="steady-state scans measured")
    parser.add_argument("--engines", default="sqlite,pg", help="comma list: sqlite, pg")
    args = parser.parse_args()
    for name in args.engines.split(","):
        if name == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                bench_engine("sqlite", f"sqlite:///{Path(tmp) / 'ledger.db'}", args)
        elif name == "pg":
            with scratch_schema(PG_URL, "cg_bench") as url:
                bench_engine("postgresql", url, args)


if __name__ == "__main__":
    main()
