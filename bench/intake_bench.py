"""Intake throughput: messages/s from .eml files into the ledger (receive_files), SQLite and PostgreSQL.

Each message is one ledger transaction (email + job + audit entry), as in production.
Usage: python bench/intake_bench.py [--n 1000] [--pg-url postgresql://postgres@127.0.0.1:5432/test] [--no-pg]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from crewguard.crew.intake.receive import receive_files
from crewguard.crew.ledger import db
from crewguard.settings import Settings

#: Messages per run.
DEFAULT_N = 1000
#: The PostgreSQL server used by the tests (a throwaway schema is created and dropped there).
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def write_messages(folder: Path, n: int) -> list[Path]:
    """`n` small distinct support emails as .eml files in `folder`."""
    run = uuid.uuid4().hex[:8]
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.eml"
        path.write_bytes(
            (
                f"From: Customer {i} <customer{i}@example.com>\r\nTo: support@example.com\r\n"
                f"Subject: Order {i} arrived damaged\r\nMessage-ID: <bench-{run}-{i}@example.com>\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
                f"Hello, my order #{i} arrived damaged. Please send a replacement.\r\n"
            ).encode()
        )
        paths.append(path)
    return paths


def bench_receive_files(url: str, paths: list[Path]) -> float:
    """Receive `paths` into a fresh ledger at `url`; returns messages per second."""
    engine = db.open_engine(url)
    try:
        start = time.perf_counter()
        results = receive_files(engine, paths, settings=Settings())
        elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    assert all(r.ok and not r.duplicate for r in results), "every message should be new"
    return len(paths) / elapsed


def bench_postgres(admin_url: str, paths: list[Path]) -> float:
    """Run the benchmark in a throwaway schema of the PostgreSQL database at `admin_url`."""
    with db.scratch_schema(admin_url, "cg_bench") as url:
        return bench_receive_files(url, paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="messages per engine")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server to use")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_messages(folder, args.n)
        rate = bench_receive_files(db.default_sqlite_url(folder / "sqlite"), paths)
        print(f"sqlite     receive_files: {args.n} messages, {rate:8.1f} messages/s")
        if not args.no_pg:
            paths = write_messages(folder, args.n)  # new Message-IDs
            rate = bench_postgres(args.pg_url, paths)
            print(f"postgresql receive_files: {args.n} messages, {rate:8.1f} messages/s")


if __name__ == "__main__":
    main()
