"""RabbitIntake against the local RabbitMQ: ack after commit, crashes, dead letters, outages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DataError, OperationalError

from crewguard.crew.intake import cursors
from crewguard.crew.intake.rabbitmq import DEAD_SUFFIX, RabbitIntake, publish_email, publish_emails
from crewguard.crew.intake.receive import ReceiveResult, receive_email
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import emails
from crewguard.settings import Settings
from tests.intake_services.conftest import RABBIT_URL

#: Generous upper bound for something that should happen "soon" (not a timing assertion).
EVENTUALLY_S = 60.0
ROOT = Path(__file__).resolve().parents[2]
POISON_HEADER = b"X-Test-Unstorable: yes"


def message(tag: str, n: int, extra_header: bytes = b"") -> bytes:
    head = (
        f"From: customer{n}@example.com\r\nSubject: {tag} order {n}\r\nMessage-ID: <{tag}-{n}@example.com>\r\n"
    ).encode()
    return head + (extra_header + b"\r\n" if extra_header else b"") + f"\r\nbody {n}\r\n".encode()


def rabbit_config(queue: str, **overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "url": RABBIT_URL,
        "queue": queue,
        "dead_letter_exchange": queue + ".dlx",
        "prefetch": 8,
        "reconnect_cap_s": 1.0,
        **overrides,
    }


def settings_for(queue: str, **overrides: Any) -> Settings:
    return Settings(intake={"rabbitmq": rabbit_config(queue, **overrides)})


def email_count(engine: Engine) -> int:
    with db.read(engine) as conn:
        return conn.execute(select(func.count()).select_from(emails)).scalar_one()


def queue_depth(queue: str) -> int:
    """Ready messages in `queue` (call with no consumer holding deliveries)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def get_one(queue: str) -> bytes | None:
    connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    try:
        channel = connection.channel()
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        return body if method is not None else None
    finally:
        connection.close()


def drain_until(intake: RabbitIntake, check: Callable[[], bool], what: str) -> int:
    """Call poll() (as the daemon does) until `check()`; returns the sum of what poll() reported."""
    total = 0
    deadline = time.monotonic() + EVENTUALLY_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        total += intake.poll()
        time.sleep(0.02)
    return total


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = db.open_engine(sqlite_url)
    yield engine
    engine.dispose()


def test_published_while_down_all_received_and_acked(rabbit_queue: str, ledger_url: str) -> None:
    engine = db.open_engine(ledger_url)
    raws = [message("down", n) for n in range(20)]
    assert publish_emails(RABBIT_URL, rabbit_queue, raws, dead_letter_exchange=rabbit_queue + ".dlx") == 20
    intake = RabbitIntake(engine, settings_for(rabbit_queue))
    try:
        received = drain_until(intake, lambda: email_count(engine) == 20, "20 emails in the ledger")
        publish_email(RABBIT_URL, rabbit_queue, message("live", 1))
        received += drain_until(intake, lambda: email_count(engine) == 21, "the 21st email")
        received += intake.poll()
    finally:
        intake.close()
    assert received == 21
    assert queue_depth(rabbit_queue) == 0  # every delivery was acked
    assert queue_depth(rabbit_queue + DEAD_SUFFIX) == 0
    with db.read(engine) as conn:
        sources = set(conn.execute(select(emails.c.source)).scalars())
    assert sources == {"rabbitmq"}
    [state] = [s for s in cursors.intake_states(engine) if s["source"] == intake.source]
    assert state["connected"] is True and "guest" not in state["source"]
    engine.dispose()


CRASH_SCRIPT = """
import json, os, signal, sys
from crewguard.crew.intake.rabbitmq import RabbitIntake
from crewguard.crew.ledger import db
from crewguard.settings import Settings

engine = db.open_engine(sys.argv[1])
settings = Settings(intake={"rabbitmq": json.loads(sys.argv[2])})
intake = RabbitIntake(engine, settings, after_commit=lambda result: os.kill(os.getpid(), signal.SIGKILL))
while True:
    intake.poll()
"""


def test_killed_between_commit_and_ack_redelivered_without_duplicate(
    rabbit_queue: str, engine: Engine, sqlite_url: str
) -> None:
    config = rabbit_config(rabbit_queue, prefetch=1)
    publish_emails(
        RABBIT_URL,
        rabbit_queue,
        [message("crash", n) for n in range(3)],
        dead_letter_exchange=config["dead_letter_exchange"],
    )
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, sqlite_url, json.dumps(config)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert email_count(engine) == 1  # committed, never acked
    eventually_depth = time.monotonic() + EVENTUALLY_S
    while queue_depth(rabbit_queue) != 3:  # the broker requeues the unacked delivery
        assert time.monotonic() < eventually_depth, "the unacked message never came back"
        time.sleep(0.1)

    seen: list[ReceiveResult] = []
    intake = RabbitIntake(engine, Settings(intake={"rabbitmq": config}), after_commit=seen.append)
    try:
        drain_until(intake, lambda: len(seen) == 3, "3 deliveries")
    finally:
        intake.close()
    assert sorted(r.duplicate for r in seen) == [False, False, True]  # the crashed one is absorbed
    assert email_count(engine) == 3
    assert queue_depth(rabbit_queue) == 0


class UnstorableLedger:
    """receive_email, except that the ledger refuses messages carrying POISON_HEADER (a data error)."""

    def __call__(self, engine: Engine, raw: bytes, **kwargs: Any) -> ReceiveResult:
        if POISON_HEADER in raw:
            raise DataError("INSERT INTO emails ...", {}, ValueError("value out of range for this column"))
        return receive_email(engine, raw, **kwargs)


def test_unstorable_message_is_dead_lettered_and_others_flow(rabbit_queue: str, engine: Engine) -> None:
    poison = message("poison", 1, POISON_HEADER)
    raws = [message("good", 1), poison, message("good", 2)]
    publish_emails(RABBIT_URL, rabbit_queue, raws, dead_letter_exchange=rabbit_queue + ".dlx")
    intake = RabbitIntake(engine, settings_for(rabbit_queue), receive=UnstorableLedger())
    try:
        drain_until(intake, lambda: email_count(engine) == 2, "the 2 good emails")
        drain_until(intake, lambda: queue_depth(rabbit_queue + DEAD_SUFFIX) == 1, "one dead letter")
    finally:
        intake.close()
    assert get_one(rabbit_queue + DEAD_SUFFIX) == poison  # kept, byte for byte
    assert queue_depth(rabbit_queue) == 0
    [state] = cursors.intake_states(engine)
    assert state["dead_lettered"] == 1 and "dead-lettered" in state["last_error"]


class FlakyLedger:
    """receive_email behind a ledger that is down for its first `outages` calls."""

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.calls = 0

    def __call__(self, engine: Engine, raw: bytes, **kwargs: Any) -> ReceiveResult:
        self.calls += 1
        if self.calls <= self.outages:
            raise OperationalError(
                "INSERT INTO emails ...", {}, ConnectionError("server closed the connection")
            )
        return receive_email(engine, raw, **kwargs)


def test_ledger_outage_requeues_and_backs_off_then_everything_arrives(
    rabbit_queue: str, engine: Engine
) -> None:
    publish_emails(
        RABBIT_URL,
        rabbit_queue,
        [message("outage", n) for n in range(5)],
        dead_letter_exchange=rabbit_queue + ".dlx",
    )
    ledger = FlakyLedger(outages=2)
    intake = RabbitIntake(engine, settings_for(rabbit_queue), receive=ledger)
    try:
        drain_until(intake, lambda: email_count(engine) == 5, "all 5 emails after the outage")
    finally:
        intake.close()
    assert ledger.calls == 7  # two refused attempts, then each message once
    assert queue_depth(rabbit_queue) == 0 and queue_depth(rabbit_queue + DEAD_SUFFIX) == 0


def _close_connection_named(name: str) -> None:
    """Make the broker drop one connection (others on this shared broker are left alone)."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl not available: cannot make the broker drop a connection")
    listing = subprocess.run(
        [rabbitmqctl, "list_connections", "pid", "client_properties", "--no-table-headers", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if listing.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot reach the broker: {listing.stderr.strip()[:200]}")
    pids = [line.split("\t", 1)[0] for line in listing.stdout.splitlines() if f'"{name}"' in line]
    assert pids, f"connection {name} not listed by the broker"
    for pid in pids:
        subprocess.run(
            [rabbitmqctl, "close_connection", pid, "crewguard test: broker restart"],
            check=True,
            capture_output=True,
            timeout=60,
        )


def test_broker_drops_the_connection_reconnects_and_later_messages_arrive(
    rabbit_queue: str, engine: Engine
) -> None:
    name = f"crewguard-test-{uuid.uuid4().hex[:8]}"
    publish_emails(
        RABBIT_URL,
        rabbit_queue,
        [message("before", n) for n in range(3)],
        dead_letter_exchange=rabbit_queue + ".dlx",
    )
    intake = RabbitIntake(engine, settings_for(rabbit_queue), connection_name=name)
    try:
        drain_until(intake, lambda: email_count(engine) == 3, "3 emails before the drop")
        _close_connection_named(name)
        drain_until(
            intake,
            lambda: any(s.get("connected") is False for s in cursors.intake_states(engine)),
            "the intake notices the dropped connection",
        )
        publish_emails(RABBIT_URL, rabbit_queue, [message("after", n) for n in range(3)])
        drain_until(intake, lambda: email_count(engine) == 6, "3 more emails after reconnecting")
    finally:
        intake.close()
    [state] = cursors.intake_states(engine)
    assert state["connected"] is True
    assert queue_depth(rabbit_queue) == 0


def test_publish_to_a_missing_queue_raises(rabbit_queue: str) -> None:
    with pytest.raises(pika.exceptions.UnroutableError):
        publish_email(RABBIT_URL, rabbit_queue + ".nowhere", message("lost", 1))


def test_bad_credentials_reported_without_the_password(
    rabbit_queue: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "pw-" + uuid.uuid4().hex[:8]
    intake = RabbitIntake(engine, settings_for(rabbit_queue, url=f"amqp://guest:{secret}@127.0.0.1:5672/%2F"))
    try:
        drain_until(
            intake,
            lambda: any(s.get("last_error") for s in cursors.intake_states(engine)),
            "an error reported",
        )
    finally:
        intake.close()
    [state] = cursors.intake_states(engine)
    assert state["connected"] is False
    assert secret not in json.dumps(state) and secret not in caplog.text
