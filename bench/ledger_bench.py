"""Ledger throughput: jobs/s for enqueue, then claim + complete_ticketed with N worker threads.

    python bench/ledger_bench.py                      # SQLite (temp file) and PostgreSQL (fresh schema)
    python bench/ledger_bench.py --url sqlite:///tmp/x.db --n 500 --workers 2

Each enqueue and each claim / completion is its own transaction, as in the daemon.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from crewguard.crew.ledger import db, jobs, queries

#: Jobs per run.
DEFAULT_N = 2000
#: Concurrent claimer threads.
DEFAULT_WORKERS = 4
#: The PostgreSQL server the default run uses (a fresh schema is created and dropped).
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Long enough that no lease expires during a run.
LEASE_S = 600.0


def enqueue_all(url: str, n: int) -> float:
    engine = db.open_engine(url)
    start = time.perf_counter()
    for i in range(n):
        with db.write(engine) as conn:
            jobs.enqueue_email(
                conn,
                key=f"{i:064x}",
                raw=f"Subject: bench {i}\r\n\r\nbody".encode(),
                source="file",
                source_ref=None,
                message_id=f"<{i}@bench>",
                subject=f"bench {i}",
                sender="bench@example.com",
                parse_error=None,
                max_attempts=3,
            )
    elapsed = time.perf_counter() - start
    engine.dispose()
    return elapsed


def drain(url: str, workers: int) -> tuple[float, int]:
    engines = [db.open_engine(url, create=False) for _ in range(workers)]
    done = [0] * workers
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            while (claim := jobs.claim_next_job(engines[i], f"bench-{i}", lease_s=LEASE_S)) is not None:
                with db.write(engines[i]) as conn:
                    jobs.complete_ticketed(
                        conn,
                        claim,
                        sink="helpdesk",
                        team="t",
                        category="c",
                        classifier="llm",
                        external_id=None,
                    )
                done[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for engine in engines:
        engine.dispose()
    if errors:
        raise errors[0]
    return elapsed, sum(done)


def bench(label: str, url: str, n: int, workers: int) -> None:
    enq_s = enqueue_all(url, n)
    drain_s, done = drain(url, workers)
    engine = db.open_engine(url, create=False)
    snap = queries.status_snapshot(engine)
    engine.dispose()
    assert done == n and snap["emails"]["ticketed"] == n, (done, snap["emails"])
    print(
        f"{label:<10} n={n} workers={workers}  enqueue {n / enq_s:8.1f} jobs/s  "
        f"claim+complete {n / drain_s:8.1f} jobs/s  end-to-end {n / (enq_s + drain_s):8.1f} jobs/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="one ledger URL (default: SQLite temp file, then PostgreSQL)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per run")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="claimer threads")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="server for the default PostgreSQL run")
    args = parser.parse_args()
    if args.url:
        bench(args.url.split(":", 1)[0], args.url, args.n, args.workers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{Path(tmp) / 'ledger.db'}", args.n, args.workers)
    with db.scratch_schema(args.pg_url, "cg_bench") as url:
        bench("postgresql", url, args.n, args.workers)


if __name__ == "__main__":
    main()
