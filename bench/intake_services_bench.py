"""Intake throughput from real services into a SQLite ledger: messages/s for IMAP and RabbitMQ.

    python bench/intake_services_bench.py [--imap 300] [--rabbit 1000] [--skip-imap] [--skip-rabbit]

IMAP: a rootless Dovecot (the test fixture's) holds N messages delivered beforehand with APPEND;
timed is ImapIntake.sync_once(): UID/size listing, BODY.PEEK[] fetches, one ledger transaction
per message, the flag STORE and the cursor, i.e. everything up to "received and acknowledged".
RabbitMQ: N messages published beforehand (publisher confirms, timed separately); timed is the
daemon's loop calling RabbitIntake.poll() until all N are in the ledger and acked.
`ledger only` is receive_email() alone on the same kind of ledger: the ceiling for both.
SQLite runs with db.open_engine's settings (WAL, synchronous=FULL).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Dovecot fixture lives with the tests

from sqlalchemy import Engine, func, select  # noqa: E402

from crewguard.crew.intake.imap import ImapIntake  # noqa: E402
from crewguard.crew.intake.rabbitmq import RabbitIntake, publish_emails  # noqa: E402
from crewguard.crew.intake.receive import receive_email  # noqa: E402
from crewguard.crew.ledger import db  # noqa: E402
from crewguard.crew.ledger.schema import emails  # noqa: E402
from crewguard.settings import Settings  # noqa: E402

#: The local broker the tests use.
RABBIT_URL = os.environ.get("CREWGUARD_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: Body filler so a message looks like a short support email (~1.2 KB in all).
BODY = "Hello, my order has not arrived yet and the tracking page shows no update. " * 14


def message(tag: str, n: int) -> bytes:
    return (
        f"From: customer{n}@example.com\r\nTo: support@example.com\r\nSubject: {tag} order {n}\r\n"
        f"Message-ID: <{tag}-{n}@bench.example.com>\r\nDate: Mon, 24 Nov 2025 10:00:00 +0000\r\n\r\n{BODY}\r\n"
    ).encode()


def new_engine() -> Engine:
    return db.open_engine(f"sqlite:///{tempfile.mkdtemp(prefix='cg-intake-bench-')}/ledger.db")


def count(engine: Engine) -> int:
    with db.read(engine) as conn:
        return conn.execute(select(func.count()).select_from(emails)).scalar_one()


def report(label: str, n: int, seconds: float) -> None:
    print(
        f"{label:<40} N={n:<5} {seconds:8.2f} s  {n / seconds:8.1f} msg/s  {1000 * seconds / n:7.2f} ms/msg"
    )


def bench_ledger_only(n: int) -> None:
    engine, settings, tag = new_engine(), Settings(), uuid.uuid4().hex[:6]
    raws = [message(tag, i) for i in range(n)]
    started = time.perf_counter()
    for raw in raws:
        receive_email(engine, raw, source="bench", source_ref=None, settings=settings)
    report("ledger only (receive_email)", n, time.perf_counter() - started)


def bench_imap(n: int) -> None:
    from tests.intake_services.conftest import (
        IMAP_PASSWORD,
        IMAP_PASSWORD_ENV,
        IMAP_USER,
        Dovecot,
        dovecot_binary,
    )

    binary = dovecot_binary()
    if binary is None:
        print("imap: Dovecot is not installed (run .ci/services.sh)")
        return
    os.environ[IMAP_PASSWORD_ENV] = IMAP_PASSWORD
    server = Dovecot(binary)
    try:
        server.start()
        tag = uuid.uuid4().hex[:6]
        started = time.perf_counter()
        server.append([message(tag, i) for i in range(n)])
        report("imap APPEND (delivery, not intake)", n, time.perf_counter() - started)
        engine = new_engine()
        settings = Settings(
            intake={
                "imap": {
                    "enabled": True,
                    "port": server.port,
                    "security": "none",
                    "username": IMAP_USER,
                    "password_env": IMAP_PASSWORD_ENV,
                }
            }
        )
        intake = ImapIntake(engine, settings)
        try:
            started = time.perf_counter()
            results = intake.sync_once()
            elapsed = time.perf_counter() - started
        finally:
            intake.close()
        assert len(results) == n and count(engine) == n, (len(results), count(engine))
        report("imap intake -> ledger (+flag)", n, elapsed)
    finally:
        server.cleanup()


def bench_rabbit(n: int) -> None:
    queue = f"crewguard.bench.{uuid.uuid4().hex[:8]}"
    dlx = queue + ".dlx"
    tag = uuid.uuid4().hex[:6]
    started = time.perf_counter()
    publish_emails(RABBIT_URL, queue, (message(tag, i) for i in range(n)), dead_letter_exchange=dlx)
    report("rabbitmq publish (confirms)", n, time.perf_counter() - started)
    engine = new_engine()
    settings = Settings(
        intake={"rabbitmq": {"enabled": True, "url": RABBIT_URL, "queue": queue, "dead_letter_exchange": dlx}}
    )
    intake = RabbitIntake(engine, settings)
    try:
        started = time.perf_counter()
        received = 0
        while received < n:
            received += intake.poll()
        elapsed = time.perf_counter() - started
    finally:
        intake.close()
        _delete_queue(queue, dlx)
    assert count(engine) == n
    report(f"rabbitmq intake -> ledger (+ack) p{settings.intake.rabbitmq.prefetch}", n, elapsed)


def _delete_queue(queue: str, dlx: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    try:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.queue_delete(queue + ".dead")
        channel.exchange_delete(dlx)
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--imap", type=int, default=300, help="messages through IMAP")
    parser.add_argument("--rabbit", type=int, default=1000, help="messages through RabbitMQ")
    parser.add_argument("--skip-imap", action="store_true")
    parser.add_argument("--skip-rabbit", action="store_true")
    args = parser.parse_args()
    bench_ledger_only(max(args.imap, args.rabbit))
    if not args.skip_imap:
        bench_imap(args.imap)
    if not args.skip_rabbit:
        bench_rabbit(args.rabbit)


if __name__ == "__main__":
    main()
