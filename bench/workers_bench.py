"""Worker benchmarks: child process start time, and end-to-end echo throughput of the crew daemon.

    python bench/workers_bench.py                     # both parts, defaults below
    python bench/workers_bench.py --part start --starts 40
    python bench/workers_bench.py --part throughput --emails 150 --workers 1 2 4

Start time: p50/p95 of `Process.start()` and of the time until the child runs its first line,
for a fork server preloaded with crewai + crewguard.agents.crew_factory (production default),
a plain fork server, and plain spawn for reference. Each mode runs in its own interpreter, since
a process has one fork server.

Throughput: N emails enqueued through the real intake into a SQLite ledger, then
`crewguard crew run --once --workers W` with the echo handler (a random pause of up to
ECHO_MAX_SLEEP_S per email, mean half of it); emails/s from the first claim to the last ticket,
and wall time including the daemon's own start.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}.items():
    os.environ.setdefault(_name, _value)

#: Child starts measured per mode.
DEFAULT_STARTS = 40
#: Emails per throughput run.
DEFAULT_EMAILS = 150
#: Worker counts compared (the machine has 2 shared cores: keep it modest).
DEFAULT_WORKERS = (1, 2, 4)
#: Start modes: name -> (multiprocessing start method, fork server preload).
START_MODES: dict[str, tuple[str, list[str]]] = {
    "forkserver+crewai": ("forkserver", ["crewai", "crewguard.agents.crew_factory"]),
    "forkserver plain": ("forkserver", []),
    "spawn plain": ("spawn", []),
}


def first_line(conn: Connection) -> None:
    """The child's first line: report when it ran (CLOCK_MONOTONIC is system-wide on Linux)."""
    conn.send(time.monotonic())
    conn.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_starts(mode: str, starts: int) -> dict[str, float]:
    """Runs inside a fresh interpreter: start `starts` children one by one."""
    method, preload = START_MODES[mode]
    ctx = multiprocessing.get_context(method)
    server_s = 0.0
    if method == "forkserver":
        ctx.set_forkserver_preload(preload)
        t0 = time.monotonic()
        from multiprocessing import forkserver

        forkserver.ensure_running()  # as the daemon does: pay the preload up front
        # ensure_running returns before the preload ends; the first start waits for it
        warm = _start_one(ctx)
        server_s = time.monotonic() - t0
        del warm
    start_s, first_s = [], []
    for _ in range(starts):
        s, f = _start_one(ctx)
        start_s.append(s)
        first_s.append(f)
    return {
        "server_ready_s": server_s,
        "start_p50_ms": 1000 * statistics.median(start_s),
        "start_p95_ms": 1000 * pct(start_s, 0.95),
        "first_line_p50_ms": 1000 * statistics.median(first_s),
        "first_line_p95_ms": 1000 * pct(first_s, 0.95),
    }


def _start_one(ctx: multiprocessing.context.BaseContext) -> tuple[float, float]:
    recv, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=first_line, args=(send,))
    t0 = time.monotonic()
    process.start()
    started = time.monotonic() - t0
    ran_at = recv.recv()
    process.join()
    send.close()
    recv.close()
    return started, ran_at - t0


def bench_starts(starts: int) -> None:
    print(f"child start ({starts} starts per mode; ms)")
    print(f"{'mode':<20} {'server ready':>12} {'start p50':>10} {'p95':>7} {'first line p50':>15} {'p95':>7}")
    for mode in START_MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--measure-starts", mode, "--starts", str(starts)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{mode:<20} {r['server_ready_s'] * 1000:>10.0f}ms {r['start_p50_ms']:>10.1f} "
            f"{r['start_p95_ms']:>7.1f} {r['first_line_p50_ms']:>15.1f} {r['first_line_p95_ms']:>7.1f}"
        )


def bench_throughput(emails: int, worker_counts: list[int]) -> None:
    import yaml
    from sqlalchemy import func, select

    from crewguard.crew.intake.receive import receive_email
    from crewguard.crew.ledger import db
    from crewguard.crew.ledger.schema import emails as emails_table
    from crewguard.crew.ledger.schema import runs
    from crewguard.crew.workers.handlers import ECHO_MAX_SLEEP_S
    from crewguard.settings import PACKAGED_CONFIG_DIR, load_settings

    print(f"\necho throughput, SQLite, {emails} emails, echo pause uniform(0, {ECHO_MAX_SLEEP_S}) s")
    print(f"{'workers':>7} {'emails/s (claims)':>18} {'wall s':>7} {'ideal emails/s':>15}")
    for workers in worker_counts:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "crewguard.yaml"
            data = yaml.safe_load((PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text())
            data["data_dir"] = str(Path(tmp) / "data")
            data["workers"] = {
                **data["workers"],
                "handler": "echo",
                "preload": ["crewguard.crew.ledger.jobs"],
            }
            config.write_text(yaml.safe_dump(data))
            settings = load_settings(config)
            engine = db.open_engine(settings.db_url)
            for n in range(emails):
                raw = (
                    f"From: c{n}@example.com\r\nSubject: bench {n}\r\nMessage-ID: <wb{n}@bench>\r\n\r\nhi\r\n"
                )
                receive_email(engine, raw.encode(), source="bench", source_ref=None, settings=settings)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CREWGUARD_")}
            env["CREWGUARD_CONFIG"] = str(config)
            t0 = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "crewguard.cli", "crew", "run", "--once", "--workers", str(workers)],
                env=env,
                check=True,
                stderr=subprocess.DEVNULL,
            )
            wall = time.monotonic() - t0
            with db.read(engine) as conn:
                first, last = conn.execute(
                    select(func.min(runs.c.started_at), func.max(runs.c.ended_at))
                ).one()
                ticketed = conn.execute(
                    select(func.count()).where(emails_table.c.state == "ticketed")
                ).scalar_one()
            engine.dispose()
            assert ticketed == emails, (ticketed, emails)
            ideal = workers / (ECHO_MAX_SLEEP_S / 2)
            print(f"{workers:>7} {emails / (last - first):>18.1f} {wall:>7.1f} {ideal:>15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["start", "throughput", "all"], default="all")
    parser.add_argument("--starts", type=int, default=DEFAULT_STARTS, help="child starts per mode")
    parser.add_argument("--emails", type=int, default=DEFAULT_EMAILS, help="emails per throughput run")
    parser.add_argument("--workers", type=int, nargs="+", default=list(DEFAULT_WORKERS))
    parser.add_argument("--measure-starts", help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = parser.parse_args()
    if args.measure_starts:
        print(json.dumps(measure_starts(args.measure_starts, args.starts)))
        return
    if args.part in ("start", "all"):
        bench_starts(args.starts)
    if args.part in ("throughput", "all"):
        bench_throughput(args.emails, args.workers)


if __name__ == "__main__":
    main()
