"""ImapIntake against a real Dovecot: ingest-then-flag, crashes, UIDVALIDITY changes, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from crewguard.crew.intake import cursors
from crewguard.crew.intake.imap import ImapIntake
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import emails
from crewguard.settings import Settings
from tests.intake_services.conftest import IMAP_PASSWORD, IMAP_PASSWORD_ENV, IMAP_USER, Dovecot

#: Generous upper bound for something that should happen "soon" (not a timing assertion).
EVENTUALLY_S = 60.0
PROCESSED = "$CrewguardProcessed"
ROOT = Path(__file__).resolve().parents[2]


def message(tag: str, n: int, body: str = "") -> bytes:
    return (
        f"From: customer{n}@example.com\r\nTo: support@example.com\r\nSubject: {tag} order {n}\r\n"
        f"Message-ID: <{tag}-{n}@example.com>\r\n\r\nWhere is my order {n}?\r\n{body}"
    ).encode()


def imap_config(server: Dovecot, **overrides: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "host": "127.0.0.1",
        "port": server.port,
        "security": "none",
        "username": IMAP_USER,
        "password_env": IMAP_PASSWORD_ENV,
        "poll_s": 2.0,
        "reconnect_cap_s": 1.0,
        **overrides,
    }


def settings_for(server: Dovecot, *, max_bytes: int | None = None, **overrides: Any) -> Settings:
    intake: dict[str, Any] = {"imap": imap_config(server, **overrides)}
    if max_bytes is not None:
        intake["max_message_bytes"] = max_bytes
    return Settings(intake=intake)


def email_keys(engine: Engine) -> list[str]:
    with db.read(engine) as conn:
        return list(conn.execute(select(emails.c.message_id).order_by(emails.c.message_id)).scalars())


def email_count(engine: Engine) -> int:
    with db.read(engine) as conn:
        return conn.execute(select(func.count()).select_from(emails)).scalar_one()


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + EVENTUALLY_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.1)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = db.open_engine(sqlite_url)
    yield engine
    engine.dispose()


def test_mail_delivered_while_down_is_all_received_then_new_mail_arrives(
    dovecot: Dovecot, imap_env: str, ledger_url: str
) -> None:
    engine = db.open_engine(ledger_url)
    dovecot.append([message("down", n) for n in range(5)])
    intake = ImapIntake(engine, settings_for(dovecot))
    received = 0

    def received_reaches(total: int) -> bool:
        nonlocal received
        received += intake.poll()  # the first call starts the thread
        return received >= total

    try:
        eventually(lambda: received_reaches(5), "5 emails received")
        eventually(lambda: all(PROCESSED in f for f in dovecot.flags().values()), "all flagged")
        dovecot.append([message("live", n) for n in range(3)])  # IDLE (or the poll) picks these up
        eventually(lambda: received_reaches(8), "8 emails received")
    finally:
        intake.close()
    assert received == 8 and email_count(engine) == 8
    flags = dovecot.flags()
    assert len(flags) == 8 and all(PROCESSED in f and "\\Seen" not in f for f in flags.values())
    cursor = cursors.get_cursor(engine, intake.source)
    assert cursor is not None and cursor.last_uid == 8 and cursor.uidvalidity == dovecot.uidvalidity()
    [state] = [s for s in cursors.intake_states(engine) if s["source"] == intake.source]
    assert state["connected"] is True and state["received"] == 8 and state["last_message_at"]
    with db.read(engine) as conn:
        refs = list(conn.execute(select(emails.c.source, emails.c.source_ref)))
    assert {source for source, _ in refs} == {"imap"}
    assert all(";UID=" in ref for _, ref in refs)
    engine.dispose()


CRASH_SCRIPT = """
import json, os, signal, sys
from crewguard.crew.intake.imap import ImapIntake
from crewguard.crew.ledger import db
from crewguard.settings import Settings

engine = db.open_engine(sys.argv[1])
settings = Settings(intake={"imap": json.loads(sys.argv[2])})
ImapIntake(engine, settings, after_commit=lambda result: os.kill(os.getpid(), signal.SIGKILL)).sync_once()
"""


def test_killed_between_commit_and_flag_no_duplicate_and_flagged_after_restart(
    dovecot: Dovecot, imap_env: str, engine: Engine, sqlite_url: str
) -> None:
    dovecot.append([message("crash", n) for n in range(3)])
    config = imap_config(dovecot)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, sqlite_url, json.dumps(config)],
        cwd=ROOT,
        env={**os.environ, IMAP_PASSWORD_ENV: IMAP_PASSWORD},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert email_count(engine) == 1  # committed ...
    assert not any(PROCESSED in f for f in dovecot.flags().values())  # ... but never flagged

    intake = ImapIntake(engine, Settings(intake={"imap": config}))
    try:
        results = intake.sync_once()
    finally:
        intake.close()
    assert [r.duplicate for r in results] == [True, False, False]  # the crashed one is absorbed
    assert email_keys(engine) == [f"<crash-{n}@example.com>" for n in range(3)]
    assert all(PROCESSED in f for f in dovecot.flags().values())


def test_uidvalidity_change_rescans_and_loses_nothing(
    dovecot: Dovecot, imap_env: str, engine: Engine
) -> None:
    folder = "Support"
    old = [message("old", n) for n in range(3)]
    dovecot.append(old, folder)
    intake = ImapIntake(engine, settings_for(dovecot, folder=folder))
    try:
        assert len(intake.sync_once()) == 3
        before = dovecot.uidvalidity(folder)
        # The folder is rebuilt (e.g. restored from backup): same old mail plus new mail, new UIDs.
        with dovecot.client() as box:
            box.folder.delete(folder)
            box.folder.create(folder)
        new = [message("new", n) for n in range(2)]
        dovecot.append([new[0], *old, new[1]], folder)
        assert dovecot.uidvalidity(folder) != before
        results = []
        for _ in range(3):  # the server may drop a session whose folder was deleted: reconnect
            try:
                results = intake.sync_once()
                break
            except Exception:
                continue
    finally:
        intake.close()
    assert len(results) == 5 and sum(not r.duplicate for r in results) == 2
    assert email_count(engine) == 5
    assert all(PROCESSED in f for f in dovecot.flags(folder).values())
    cursor = cursors.get_cursor(engine, intake.source)
    assert cursor is not None and cursor.uidvalidity == dovecot.uidvalidity(folder) and cursor.last_uid == 5


def test_server_restart_mid_run_reconnects_and_later_mail_arrives(
    dovecot: Dovecot, imap_env: str, engine: Engine
) -> None:
    intake = ImapIntake(engine, settings_for(dovecot))
    try:
        dovecot.append([message("before", n) for n in range(2)])
        intake.poll()
        eventually(lambda: email_count(engine) == 2, "2 emails before the restart")
        dovecot.stop()
        eventually(
            lambda: any(s.get("connected") is False for s in cursors.intake_states(engine)),
            "the intake reports the server gone",
        )
        dovecot.start()
        dovecot.append([message("after", n) for n in range(2)])
        eventually(lambda: email_count(engine) == 4, "2 more emails after the restart")
        eventually(lambda: all(s.get("connected") for s in cursors.intake_states(engine)), "connected again")
    finally:
        intake.close()
    assert all(PROCESSED in f for f in dovecot.flags().values())


def test_oversize_message_goes_to_review_truncated_and_is_flagged(
    dovecot: Dovecot, imap_env: str, engine: Engine
) -> None:
    cap = 2000
    dovecot.append([message("big", 1, body="x" * 80 + "\r\n") * 1 + b"y" * 10_000, message("small", 2)])
    intake = ImapIntake(engine, settings_for(dovecot, max_bytes=cap))
    try:
        results = intake.sync_once()
    finally:
        intake.close()
    big, small = results
    assert big.parse_error is not None and "too large" in big.parse_error
    assert small.parse_error is None
    with db.read(engine) as conn:
        sizes = dict(conn.execute(select(emails.c.message_id, emails.c.size)).all())
    assert sizes["<big-1@example.com>"] <= cap  # stored up to the cap, as evidence
    assert all(PROCESSED in f for f in dovecot.flags().values())


def test_move_mode_moves_only_after_the_commit(dovecot: Dovecot, imap_env: str, engine: Engine) -> None:
    dovecot.append([message("move", n) for n in range(3)])
    intake = ImapIntake(engine, settings_for(dovecot, processed="move", processed_folder="Done"))
    try:
        assert len(intake.sync_once()) == 3
        assert intake.sync_once() == []  # nothing left to receive
    finally:
        intake.close()
    assert dovecot.flags("INBOX") == {}
    assert len(dovecot.flags("Done")) == 3
    assert email_count(engine) == 3


def test_bad_password_is_reported_without_the_secret(
    dovecot: Dovecot, engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-pw-7f3a"
    monkeypatch.setenv(IMAP_PASSWORD_ENV, wrong)
    intake = ImapIntake(engine, settings_for(dovecot))
    try:
        intake.poll()
        eventually(
            lambda: any(s.get("last_error") for s in cursors.intake_states(engine)), "an error reported"
        )
    finally:
        intake.close()
    [state] = cursors.intake_states(engine)
    assert state["connected"] is False
    assert wrong not in json.dumps(state) and wrong not in caplog.text


def test_missing_password_variable_is_a_clear_error(
    dovecot: Dovecot, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(IMAP_PASSWORD_ENV, raising=False)
    intake = ImapIntake(engine, settings_for(dovecot))
    with pytest.raises(Exception, match=IMAP_PASSWORD_ENV):
        intake.sync_once()
