"""receive_email / receive_files on SQLite and PostgreSQL: one email, one job, nothing lost."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from crewguard.clock import FakeClock
from crewguard.crew.intake.receive import ReceiveResult, receive_email, receive_files
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import audit_log, emails, jobs, review_items
from crewguard.settings import Settings


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    eng = db.open_engine(ledger_url)
    yield eng
    eng.dispose()


@pytest.fixture
def settings() -> Settings:
    return Settings(db={"max_attempts": 4})


def message(n: int, *, body: str = "please help") -> bytes:
    return (
        f"From: customer{n}@example.com\r\nTo: support@example.com\r\nSubject: Order {n}\r\n"
        f"Message-ID: <msg-{n}@example.com>\r\n\r\n{body} #{n}\r\n"
    ).encode()


def count(engine: Engine, table) -> int:  # type: ignore[no-untyped-def]
    with db.read(engine) as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def audit_events(engine: Engine, event: str) -> list[dict]:
    with db.read(engine) as conn:
        bodies = conn.execute(select(audit_log.c.body).order_by(audit_log.c.seq)).scalars().all()
    return [b for b in map(json.loads, bodies) if b["event"] == event]


def test_receive_queues_one_job_with_fields(engine: Engine, settings: Settings) -> None:
    clock = FakeClock()
    result = receive_email(
        engine, message(1), source="file", source_ref="/in/1.eml", settings=settings, clock=clock
    )
    assert result == ReceiveResult(
        key=hashlib.sha256(b"msg-1@example.com").hexdigest(),
        duplicate=False,
        parse_error=None,
        source_ref="/in/1.eml",
    )
    with db.read(engine) as conn:
        email = conn.execute(select(emails)).one()
        job = conn.execute(select(jobs)).one()
    assert (email.key, email.state, email.subject, email.sender) == (
        result.key,
        "queued",
        "Order 1",
        "customer1@example.com",
    )
    assert email.message_id == "<msg-1@example.com>"
    assert bytes(email.raw) == message(1) and email.source == "file" and email.source_ref == "/in/1.eml"
    assert email.received_at == clock.now()
    assert (job.email_key, job.state, job.max_attempts) == (result.key, "queued", 4)
    assert [e["email_key"] for e in audit_events(engine, "email.received")] == [result.key]


def test_receive_twice_is_one_email_and_one_job(engine: Engine, settings: Settings) -> None:
    first = receive_email(engine, message(7), source="file", source_ref="a", settings=settings)
    # same Message-ID, different bytes (e.g. re-delivered with another Received: header)
    again = receive_email(
        engine, b"Received: by relay\r\n" + message(7), source="maildir", source_ref="b", settings=settings
    )
    assert not first.duplicate and again.duplicate
    assert first.key == again.key
    assert (count(engine, emails), count(engine, jobs)) == (1, 1)
    assert len(audit_events(engine, "email.received")) == 1


def test_concurrent_receives_of_the_same_messages(engine: Engine, settings: Settings) -> None:
    batch = [message(n) for n in range(10)]
    barrier = threading.Barrier(2)
    results: dict[int, list[ReceiveResult]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for raw in batch:
                results[index].append(
                    receive_email(engine, raw, source="imap", source_ref=str(index), settings=settings)
                )
        except BaseException as exc:  # surfaced below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for a, b in zip(results[0], results[1], strict=True):
        assert a.key == b.key
        assert [a.duplicate, b.duplicate].count(False) == 1  # exactly one of them queued it
    assert (count(engine, emails), count(engine, jobs)) == (10, 10)
    assert len(audit_events(engine, "email.received")) == 10


def test_unparseable_email_goes_to_review_with_reason(engine: Engine, settings: Settings) -> None:
    garbage = random.Random(1).randbytes(2048)
    result = receive_email(engine, garbage, source="file", source_ref="g", settings=settings)
    assert result.parse_error is not None and result.parse_error.startswith("not an email")
    with db.read(engine) as conn:
        email = conn.execute(select(emails)).one()
        item = conn.execute(select(review_items)).one()
        job = conn.execute(select(jobs)).one()
    assert bytes(email.raw) == garbage  # the evidence is kept
    assert (email.state, email.parse_error) == ("in_review", result.parse_error)
    assert (item.email_key, item.reason, item.state, item.detail) == (
        result.key,
        "unparseable",
        "open",
        result.parse_error,
    )
    assert job.state == "review"


def test_oversize_attachment_goes_to_review_with_capped_raw(engine: Engine) -> None:
    cap = 25 * 1024 * 1024
    settings = Settings(intake={"max_message_bytes": cap})
    attachment = base64.encodebytes(random.Random(2).randbytes(23 * 1024 * 1024))
    raw = (
        b"From: big@example.com\r\nSubject: the scan\r\nMessage-ID: <huge@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=ZZ\r\n\r\n--ZZ\r\nContent-Type: text/plain\r\n\r\nsee scan\r\n"
        b"--ZZ\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=scan.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment + b"--ZZ--\r\n"
    )
    assert len(raw) > 30 * 1024 * 1024
    result = receive_email(engine, raw, source="file", source_ref="big.eml", settings=settings)
    assert result.parse_error == f"too large: {len(raw)} bytes > cap {cap}"
    assert result.key == hashlib.sha256(b"huge@example.com").hexdigest()
    with db.read(engine) as conn:
        email = conn.execute(select(emails)).one()
        item = conn.execute(select(review_items)).one()
    assert email.state == "in_review" and email.subject == "the scan"
    assert email.size == cap and bytes(email.raw) == raw[:cap]
    assert item.reason == "unparseable" and item.detail.startswith("too large")
    # the same oversize message again is a duplicate (keyed on its Message-ID)
    assert receive_email(engine, raw, source="file", source_ref="big.eml", settings=settings).duplicate


def test_receive_files_reports_unreadable_files(engine: Engine, settings: Settings, tmp_path: Path) -> None:
    good = tmp_path / "good.eml"
    good.write_bytes(message(3))
    missing = tmp_path / "missing.eml"
    folder = tmp_path / "a-folder.eml"
    folder.mkdir()
    results = receive_files(engine, [missing, good, folder, good], settings=settings)
    assert [r.ok for r in results] == [False, True, False, True]
    assert results[0].error == f"cannot read {missing}: No such file or directory"
    assert results[2].error is not None and str(folder) in results[2].error
    assert results[0].key is None
    assert not results[1].duplicate and results[3].duplicate
    assert results[1].source_ref == str(good)
    assert (count(engine, emails), count(engine, jobs)) == (1, 1)


def test_receive_files_with_bad_content_never_raises(
    engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    contents = {
        "empty.eml": b"",
        "text.eml": b"just words, no headers\n",
        "nul.eml": b"From: a\x00@example.com\n\nx",
        "8bit.eml": b"From: \xff\xfe <x@example.com>\nSubject: \xc3\x28\n\n\xff body",
        "ok.eml": message(9),
    }
    paths = []
    for name, raw in contents.items():
        (tmp_path / name).write_bytes(raw)
        paths.append(tmp_path / name)
    results = receive_files(engine, paths, settings=settings)
    assert all(r.ok and not r.duplicate for r in results)
    errors = {Path(r.source_ref or "").name: r.parse_error for r in results}
    assert errors["empty.eml"] == "empty message"
    assert errors["text.eml"] == "not an email: no header lines found"
    assert errors["nul.eml"] is not None and "NUL" in errors["nul.eml"]
    assert errors["8bit.eml"] is None and errors["ok.eml"] is None
    assert count(engine, emails) == 5
    with db.read(engine) as conn:
        reasons = conn.execute(select(review_items.c.reason)).scalars().all()
    assert reasons == ["unparseable"] * 3
