"""Audit log speed: appends/s (one transaction per append, as in production) and verify time.

    python bench/audit_bench.py [--appends 2000] [--entries 100000] [--pg-url URL] [--no-pg]

SQLite runs in WAL with synchronous=FULL (db.open_engine's settings); PostgreSQL runs in a
throw-away schema. The verify log is built fast (precomputed chain, bulk inserts) and
checkpointed every `--checkpoint-every` entries, then verified from seq 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from sqlalchemy import Engine, text

from crewguard.clock import SYSTEM_CLOCK
from crewguard.crew.ledger import audit, db
from crewguard.crew.ledger.schema import audit_log

#: PostgreSQL server used when --pg-url is not given (the test fixture's default).
DEFAULT_PG_URL = os.environ.get("CREWGUARD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
#: Rows per INSERT batch while building the verify log.
BUILD_BATCH = 5000


def bench_appends(engine: Engine, n: int) -> float:
    """Appends per second, each in its own write transaction."""
    start = time.perf_counter()
    for i in range(n):
        with db.write(engine) as conn:
            audit.append(conn, "email.received", email_key=f"bench-{i}", size=1234, sender_hash="ab" * 16)
    return n / (time.perf_counter() - start)


def bench_appends_held(engine: Engine, n: int) -> float:
    """The same on one held connection: separates commit (fsync) cost from connection setup."""
    start = time.perf_counter()
    with engine.connect() as conn:
        for i in range(n):
            with conn.begin():
                audit.append(conn, "email.received", email_key=f"held-{i}", size=1234, sender_hash="ab" * 16)
    return n / (time.perf_counter() - start)


def build_log(engine: Engine, n: int, key_path: Path, checkpoint_dir: Path, every: int) -> None:
    """n chained entries via bulk inserts, with a signed checkpoint every `every` entries."""
    key = audit.load_or_create_signing_key(key_path)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    prev, ts, rows = audit.GENESIS_HASH, SYSTEM_CLOCK.now(), []
    for seq in range(1, n + 1):
        body = audit.canonical_json({"event": "email.received", "email_key": f"k{seq}", "ts": round(ts, 6)})
        h = audit.entry_hash(seq, prev, body)
        rows.append({"seq": seq, "ts": ts, "body": body, "prev_hash": prev, "entry_hash": h})
        prev = h
        if seq % every == 0:
            cp = audit.Checkpoint(audit.CHECKPOINT_ORIGIN, seq, h, ts)
            (checkpoint_dir / f"{seq:012d}{audit.CHECKPOINT_SUFFIX}").write_text(
                audit.sign_checkpoint(cp, key)
            )
        if len(rows) == BUILD_BATCH or seq == n:
            with db.write(engine) as conn:
                conn.execute(audit_log.insert(), rows)
            rows = []


def bench_engine(label: str, url: str, args: argparse.Namespace, work: Path) -> None:
    engine = db.open_engine(url)
    try:
        rate = bench_appends(engine, args.appends)
        print(
            f"{label}: append, 1 transaction each (db.write): {rate:,.0f} appends/s ({args.appends} appends)"
        )
        rate = bench_appends_held(engine, args.appends)
        print(f"{label}: append, 1 transaction each, one held connection: {rate:,.0f} appends/s")
    finally:
        engine.dispose()

    key_path, checkpoint_dir = work / f"{label}-key.pem", work / f"{label}-checkpoints"
    verify_url = url.replace("ledger.db", "verify.db") if url.startswith("sqlite") else url
    engine = db.open_engine(verify_url)
    try:
        if not verify_url.startswith("sqlite"):
            with db.write(engine) as conn:  # reuse the schema: drop the append rows first
                conn.execute(text("DROP TRIGGER audit_log_no_change ON audit_log"))
                conn.execute(text("DELETE FROM audit_log"))
                audit.install_guards(conn)
        start = time.perf_counter()
        build_log(engine, args.entries, key_path, checkpoint_dir, args.checkpoint_every)
        print(f"{label}: built {args.entries:,} entries in {time.perf_counter() - start:.1f} s (bulk setup)")

        pub = audit.public_key_path_for(key_path)
        start = time.perf_counter()
        result = audit.verify(engine, checkpoint_dir=checkpoint_dir, public_key_path=pub)
        elapsed = time.perf_counter() - start
        print(
            f"{label}: verify {result.entries:,} entries + {result.checkpoints} checkpoints: "
            f"{elapsed:.2f} s ({result.entries / elapsed:,.0f} entries/s) -> {audit.format_result(result)}"
        )
        tracemalloc.start()
        audit.verify(engine, checkpoint_dir=checkpoint_dir, public_key_path=pub)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{label}: verify peak Python memory (tracemalloc): {peak / 1e6:.1f} MB")

        start = time.perf_counter()
        with db.write(engine) as conn:
            audit.append(conn, "one.more")
        audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir)
        print(f"{label}: write_checkpoint after 1 new entry: {1000 * (time.perf_counter() - start):.1f} ms")
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--appends", type=int, default=2000, help="single-transaction appends to time")
    parser.add_argument("--entries", type=int, default=100_000, help="log size for the verify timing")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="entries between checkpoints")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server (a schema is created)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        work = Path(tmp)
        bench_engine("sqlite", f"sqlite:///{work / 'ledger.db'}", args, work)
        if not args.no_pg:
            with db.scratch_schema(args.pg_url, "cg_bench") as url:
                bench_engine("postgresql", url, args, work)


if __name__ == "__main__":
    main()
