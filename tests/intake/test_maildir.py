"""MaildirWatcher: ingest-then-move, crash between commit and move, files still being written."""

from __future__ import annotations

import mailbox
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from crewguard.clock import FakeClock
from crewguard.crew.intake.maildir import MaildirWatcher
from crewguard.crew.intake.receive import receive_email
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import emails, jobs, review_items
from crewguard.settings import Settings


def message(n: int) -> bytes:
    return (
        f"From: c{n}@example.com\nSubject: Order {n}\nMessage-ID: <watch-{n}@example.com>\n\nbody {n}\n"
    ).encode()


def settings_for(path: Path) -> Settings:
    return Settings(intake={"maildir": {"path": str(path)}})


def counts(engine: Engine) -> tuple[int, int]:
    with db.read(engine) as conn:
        return (
            conn.execute(select(func.count()).select_from(emails)).scalar_one(),
            conn.execute(select(func.count()).select_from(jobs)).scalar_one(),
        )


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    eng = db.open_engine(sqlite_url)
    yield eng
    eng.dispose()


@pytest.fixture
def any_engine(ledger_url: str) -> Iterator[Engine]:
    eng = db.open_engine(ledger_url)
    yield eng
    eng.dispose()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


# --------------------------------------------------------------------------- real maildir


def test_maildir_messages_move_to_cur_after_commit(engine: Engine, tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    ids = [box.add(message(n)) for n in range(3)]
    watcher = MaildirWatcher(engine, settings_for(tmp_path / "Maildir"))
    assert watcher.is_maildir
    results = watcher.scan_once()
    assert [r.duplicate for r in results] == [False] * 3 and all(r.parse_error is None for r in results)
    assert names(tmp_path / "Maildir" / "new") == []
    assert names(tmp_path / "Maildir" / "cur") == sorted(f"{i}:2,S" for i in ids)
    assert counts(engine) == (3, 3)
    assert watcher.scan_once() == []
    box.add(message(3))
    box.add(message(1))  # delivered twice: the second copy is absorbed
    assert watcher.poll() == 1
    assert counts(engine) == (4, 4)
    assert names(tmp_path / "Maildir" / "new") == []
    assert box.get_message(ids[0]).get_flags() == "S"  # still a valid maildir for any MUA


def test_crash_between_commit_and_move_is_absorbed(any_engine: Engine, tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    box.add(message(1))
    settings = settings_for(tmp_path / "Maildir")
    (pending,) = (tmp_path / "Maildir" / "new").iterdir()
    # the "crashed" run: committed to the ledger, died before the rename
    first = receive_email(
        any_engine, pending.read_bytes(), source="maildir", source_ref=str(pending), settings=settings
    )
    assert not first.duplicate
    assert pending.exists()
    (again,) = MaildirWatcher(any_engine, settings).scan_once()
    assert again.duplicate and again.key == first.key
    assert not pending.exists()
    assert names(tmp_path / "Maildir" / "cur") == [pending.name + ":2,S"]
    assert counts(any_engine) == (1, 1)


def test_maildir_ignores_tmp_and_dotfiles(engine: Engine, tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    box.add(message(1))
    (tmp_path / "Maildir" / "tmp" / "123.partial").write_bytes(b"From: half")  # delivery in progress
    (tmp_path / "Maildir" / "new" / ".hidden").write_bytes(message(2))
    results = MaildirWatcher(engine, settings_for(tmp_path / "Maildir")).scan_once()
    assert len(results) == 1
    assert counts(engine) == (1, 1)
    assert names(tmp_path / "Maildir" / "tmp") == ["123.partial"]


def test_bad_content_in_maildir_goes_to_review_and_is_moved(engine: Engine, tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    box.add(b"")  # an empty file in new/
    (result,) = MaildirWatcher(engine, settings_for(tmp_path / "Maildir")).scan_once()
    assert result.parse_error == "empty message"
    with db.read(engine) as conn:
        assert conn.execute(select(review_items.c.reason)).scalars().all() == ["unparseable"]
    assert names(tmp_path / "Maildir" / "new") == []


def test_ledger_outage_leaves_files_in_place(tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    box.add(message(1))
    # nothing listens on port 1: every transaction fails
    down = db.open_engine("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2", create=False)
    try:
        assert MaildirWatcher(down, settings_for(tmp_path / "Maildir")).scan_once() == []
    finally:
        down.dispose()
    assert len(names(tmp_path / "Maildir" / "new")) == 1


# --------------------------------------------------------------------------- plain folder


def write_aged(path: Path, raw: bytes, age_s: float) -> None:
    path.write_bytes(raw)
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_plain_folder_moves_processed_files_and_waits_for_fresh_ones(engine: Engine, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_aged(inbox / "a.eml", message(1), 60)
    write_aged(inbox / "B.EML", message(2), 60)
    write_aged(inbox / ".hidden.eml", message(3), 60)
    write_aged(inbox / "c.eml.tmp", message(4), 60)
    write_aged(inbox / "notes.txt", message(5), 60)
    write_aged(inbox / "fresh.eml", message(6), 0)  # still being written
    clock = FakeClock(time.time())
    watcher = MaildirWatcher(engine, settings_for(inbox), clock=clock)
    assert not watcher.is_maildir
    results = watcher.scan_once()
    assert sorted(Path(r.source_ref or "").name for r in results) == ["B.EML", "a.eml"]
    assert names(inbox / "processed") == ["B.EML", "a.eml"]
    assert names(inbox) == [".hidden.eml", "c.eml.tmp", "fresh.eml", "notes.txt"]
    clock.advance(5)
    (late,) = watcher.scan_once()
    assert Path(late.source_ref or "").name == "fresh.eml" and not late.duplicate
    assert counts(engine) == (3, 3)


def test_plain_folder_crash_before_move_and_name_reuse(engine: Engine, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "processed").mkdir(parents=True)
    write_aged(inbox / "processed" / "a.eml", b"an older file of the same name", 60)
    write_aged(inbox / "a.eml", message(1), 60)
    settings = settings_for(inbox)
    receive_email(engine, message(1), source="maildir", source_ref="crashed", settings=settings)
    (result,) = MaildirWatcher(engine, settings).scan_once()
    assert result.duplicate
    assert names(inbox / "processed") == ["a.1.eml", "a.eml"]
    assert (inbox / "processed" / "a.1.eml").read_bytes() == message(1)
    assert counts(engine) == (1, 1)


def test_missing_or_unset_folder_is_not_an_error(engine: Engine, tmp_path: Path) -> None:
    assert MaildirWatcher(engine, Settings()).scan_once() == []
    watcher = MaildirWatcher(engine, settings_for(tmp_path / "not-yet"))
    assert watcher.scan_once() == []
    (tmp_path / "not-yet").mkdir()
    write_aged(tmp_path / "not-yet" / "x.eml", message(1), 60)
    assert len(watcher.scan_once()) == 1
