"""CPython's own email test corpus (odd, broken and historic messages) goes through intake.

Each message is received without a crash and ends queued (for the crew) or in review with
a reason; the final states are reached later by the worker.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from crewguard.crew.intake.parse import parse_email
from crewguard.crew.intake.receive import receive_files
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import emails, jobs, review_items
from crewguard.settings import Settings

#: Lib/test/test_email/data/ ships msg_01.txt .. msg_47.txt and msg_12a.txt.
EXPECTED_MIN_FILES = 48
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"


def corpus_files() -> list[Path]:
    files = sorted(CORPUS.glob("msg_*.txt"))
    assert len(files) >= EXPECTED_MIN_FILES, (
        f"found {len(files)} msg_*.txt files in {CORPUS}, expected >= {EXPECTED_MIN_FILES} "
        "(is the interpreter's test suite installed?)"
    )
    return files


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    eng = db.open_engine(ledger_url)
    yield eng
    eng.dispose()


def test_corpus_parses_without_raising() -> None:
    for path in corpus_files():
        parsed = parse_email(path.read_bytes(), max_bytes=25 * 1024 * 1024)
        assert len(parsed.key) == 64, path.name
        for text in (parsed.subject, parsed.sender, parsed.body, *parsed.defects):
            text.encode("utf-8")  # no lone surrogates: storable as-is
            assert "\x00" not in text, path.name


def test_corpus_is_received_queued_or_in_review(engine: Engine) -> None:
    files = corpus_files()
    results = receive_files(engine, files, settings=Settings())
    assert [r.ok for r in results] == [True] * len(files)
    with db.read(engine) as conn:
        email_rows = {r.key: r for r in conn.execute(select(emails))}
        job_rows = {r.email_key: r for r in conn.execute(select(jobs))}
        open_items = {
            r.email_key: r for r in conn.execute(select(review_items).where(review_items.c.state == "open"))
        }
    keys = {r.key for r in results}
    assert set(email_rows) == keys and set(job_rows) == keys
    queued = 0
    for path, result in zip(files, results, strict=True):
        if result.duplicate:
            continue  # another corpus file carries the same Message-ID
        email, job = email_rows[result.key], job_rows[result.key]
        if result.parse_error is None:
            assert (email.state, job.state) == ("queued", "queued"), path.name
            assert result.key not in open_items, path.name
            queued += 1
        else:
            assert (email.state, job.state) == ("in_review", "review"), path.name
            item = open_items[result.key]
            assert item.reason == "unparseable" and item.detail == result.parse_error, path.name
    assert queued >= len(keys) - 3  # almost all of CPython's odd messages are still usable email
