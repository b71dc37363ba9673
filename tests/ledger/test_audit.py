"""The audit log on SQLite and PostgreSQL: append-only, and every kind of tampering is named."""

from __future__ import annotations

import multiprocessing
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError

from crewguard.clock import FakeClock
from crewguard.crew.ledger import audit, db
from crewguard.crew.ledger.schema import audit_log
from crewguard.settings import Settings

WRITERS = 3  # concurrent appender processes
APPENDS_PER_WRITER = 25


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    eng = db.open_engine(ledger_url)
    yield eng
    eng.dispose()


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "audit-signing-key.pem"


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def _fill(engine: Engine, n: int, clock: FakeClock | None = None) -> None:
    clock = clock or FakeClock()
    for _ in range(n):
        with db.write(engine) as conn:
            clock.advance(1.5)
            audit.append(conn, "email.received", email_key=f"k{clock.t}", clock=clock, size=123)


def _fill_with_checkpoints(engine: Engine, n: int, every: int, key_path: Path, checkpoint_dir: Path) -> None:
    clock = FakeClock()
    for _ in range(n):
        _fill(engine, 1, clock)
        audit.maybe_checkpoint(
            engine, key_path=key_path, checkpoint_dir=checkpoint_dir, every=every, clock=clock
        )


def _verify(engine: Engine, key_path: Path, checkpoint_dir: Path, **kw: int) -> audit.VerifyResult:
    return audit.verify(
        engine, checkpoint_dir=checkpoint_dir, public_key_path=audit.public_key_path_for(key_path), **kw
    )


def _attacker(engine: Engine, *statements: str) -> None:
    """What someone with write access to the database can do: drop the guards, then change rows."""
    with db.write(engine) as conn:
        if db.is_sqlite(conn):
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
            conn.execute(text("DROP TRIGGER audit_log_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER audit_log_no_change ON audit_log"))
        for stmt in statements:
            conn.exec_driver_sql(stmt)  # raw SQL: no bind-parameter parsing of ':' in JSON


def test_clean_chain_verifies_across_batches(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    _fill_with_checkpoints(engine, 25, 10, key_path, checkpoint_dir)

    result = _verify(engine, key_path, checkpoint_dir, batch_size=7)

    assert result.ok, result.message
    assert (result.entries, result.checkpoints, result.first_bad_seq) == (25, 2, None)
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [
        "000000000010.checkpoint",
        "000000000020.checkpoint",
    ]
    assert audit.format_result(result) == "audit log intact: 25 entries, 2 checkpoints verified"


def test_empty_log_verifies(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    audit.load_or_create_signing_key(key_path)
    assert audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir) is None
    result = _verify(engine, key_path, checkpoint_dir)
    assert result.ok and result.entries == 0


def test_update_and_delete_are_refused_by_the_database(
    engine: Engine, key_path: Path, checkpoint_dir: Path
) -> None:
    _fill(engine, 3)
    refused = [
        "UPDATE audit_log SET body = '{}' WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq = 3",
    ]
    if engine.dialect.name == "postgresql":
        refused.append("TRUNCATE audit_log")
    for stmt in refused:
        with pytest.raises(DBAPIError, match="append-only"), db.write(engine) as conn:
            conn.execute(text(stmt))
    audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir)
    result = _verify(engine, key_path, checkpoint_dir)
    assert result.ok and result.entries == 3


def test_edited_entry_is_named(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    _fill_with_checkpoints(engine, 30, 10, key_path, checkpoint_dir)
    _attacker(
        engine, """UPDATE audit_log SET body = replace(body, '"size":123', '"size":999') WHERE seq = 17"""
    )

    result = _verify(engine, key_path, checkpoint_dir, batch_size=4)

    assert not result.ok
    assert result.first_bad_seq == 17
    assert result.message == "entry 17: hash mismatch (entry edited)"
    assert result.entries == 16
    assert "entry 17: hash mismatch (entry edited)" in audit.format_result(result)


def test_edited_entry_with_recomputed_hash_is_named(
    engine: Engine, key_path: Path, checkpoint_dir: Path
) -> None:
    _fill(engine, 20)
    with db.read(engine) as conn:
        row = conn.execute(select(audit_log).where(audit_log.c.seq == 9)).one()
    forged_body = row.body.replace('"size":123', '"size":1')
    forged_hash = audit.entry_hash(9, row.prev_hash, forged_body)
    _attacker(
        engine, f"UPDATE audit_log SET body = '{forged_body}', entry_hash = '{forged_hash}' WHERE seq = 9"
    )

    audit.load_or_create_signing_key(key_path)
    result = _verify(engine, key_path, checkpoint_dir)

    assert (result.ok, result.first_bad_seq) == (False, 9)
    assert result.message == "entry 9: rewritten (entry 10 chains to a different hash)"


def test_edited_timestamp_column_is_named(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    audit.load_or_create_signing_key(key_path)
    _fill(engine, 5)
    _attacker(engine, "UPDATE audit_log SET ts = ts - 3600 WHERE seq = 4")

    result = _verify(engine, key_path, checkpoint_dir)

    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "entry 4: ts column differs" in result.message


def test_deleted_entry_is_named(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    _fill_with_checkpoints(engine, 30, 10, key_path, checkpoint_dir)
    _attacker(engine, "DELETE FROM audit_log WHERE seq = 12")

    result = _verify(engine, key_path, checkpoint_dir, batch_size=5)

    assert (result.ok, result.first_bad_seq) == (False, 12)
    assert result.message == "entry 12 missing (deleted)"


def test_truncated_tail_below_checkpoint_is_named(
    engine: Engine, key_path: Path, checkpoint_dir: Path
) -> None:
    _fill_with_checkpoints(engine, 30, 10, key_path, checkpoint_dir)
    _attacker(engine, "DELETE FROM audit_log WHERE seq > 20")

    result = _verify(engine, key_path, checkpoint_dir)

    assert (result.ok, result.first_bad_seq) == (False, 21)
    assert result.message == "log ends at 20 but checkpoint says 30 (truncated)"


def _rewrite_whole_chain(engine: Engine, edit_seq: int) -> None:
    """Replace every entry, changing one body and recomputing every hash after it."""
    with db.read(engine) as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.seq)).all()
    _attacker(engine, "DELETE FROM audit_log")
    prev = audit.GENESIS_HASH
    with db.write(engine) as conn:
        for row in rows:
            body = row.body.replace('"size":123', '"size":0') if row.seq == edit_seq else row.body
            h = audit.entry_hash(row.seq, prev, body)
            conn.execute(
                audit_log.insert().values(seq=row.seq, ts=row.ts, body=body, prev_hash=prev, entry_hash=h)
            )
            prev = h


def test_full_rewrite_is_caught_by_the_checkpoint(
    engine: Engine, key_path: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    _fill_with_checkpoints(engine, 30, 10, key_path, checkpoint_dir)
    _rewrite_whole_chain(engine, edit_seq=15)

    # The chain alone is fooled: without the checkpoints the rewritten log looks intact.
    assert _verify(engine, key_path, tmp_path / "no-checkpoints").ok
    result = _verify(engine, key_path, checkpoint_dir)

    assert (result.ok, result.first_bad_seq) == (False, 20)
    assert result.message == "entry 20 differs from signed checkpoint 000000000020.checkpoint (rewritten)"
    # And the daemon refuses to sign the rewritten log.
    _fill(engine, 1)
    with pytest.raises(audit.AuditIntegrityError, match="entry 30 differs from signed checkpoint"):
        audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir)


def test_forged_checkpoint_file_is_named(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    _fill_with_checkpoints(engine, 20, 10, key_path, checkpoint_dir)
    genuine = checkpoint_dir / "000000000020.checkpoint"
    with db.read(engine) as conn:
        hash_10 = conn.execute(select(audit_log.c.entry_hash).where(audit_log.c.seq == 10)).scalar_one()
    # Edited in place: claims the log ends at 10 with entry 10's hash, under the old signature.
    lines = genuine.read_text().split("\n")
    lines[1], lines[2] = "10", hash_10
    genuine.write_text("\n".join(lines))
    # Signed by someone else's key under our signer name.
    other = audit.Checkpoint(audit.CHECKPOINT_ORIGIN, 20, "ab" * 32, 1.0)
    (checkpoint_dir / "000000000021.checkpoint").write_text(
        audit.sign_checkpoint(other, Ed25519PrivateKey.generate())
    )

    result = _verify(engine, key_path, checkpoint_dir)

    assert not result.ok
    assert result.first_bad_seq is None
    assert result.checkpoints == 1  # only 000000000010 is still trusted
    assert result.problems == [
        "checkpoint 000000000020.checkpoint: bad signature",
        "checkpoint 000000000021.checkpoint: bad signature (no signature by our key)",
    ]
    assert audit.format_result(result).startswith(
        "audit log check FAILED: checkpoint 000000000020.checkpoint: bad signature"
    )


def test_checkpoints_only_when_new_entries(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    _fill(engine, 4)
    first = audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir)
    assert first is not None and first.name == "000000000004.checkpoint"
    assert audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir) is None
    _fill(engine, 2)
    assert audit.maybe_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir, every=3) is None
    _fill(engine, 1)
    made = audit.maybe_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir, every=3)
    assert made is not None and made.name == "000000000007.checkpoint"
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == [
        "000000000004.checkpoint",
        "000000000007.checkpoint",
    ]  # no temp files left behind
    checkpoint = audit.parse_checkpoint(made.read_text(), audit.load_public_key(f"{key_path}.pub"))
    with db.read(engine) as conn:
        assert (checkpoint.seq, checkpoint.entry_hash) == audit.head(conn)


def test_edit_is_refused_at_checkpoint_time(engine: Engine, key_path: Path, checkpoint_dir: Path) -> None:
    _fill(engine, 5)
    _attacker(engine, "UPDATE audit_log SET body = replace(body, 'email.received', 'x') WHERE seq = 3")
    with pytest.raises(audit.AuditIntegrityError, match="entry 3: hash mismatch"):
        audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir)
    assert not checkpoint_dir.exists() or not list(checkpoint_dir.iterdir())


def test_append_refuses_a_read_transaction(engine: Engine) -> None:
    with pytest.raises(ValueError, match="write transaction"), db.read(engine) as conn:
        audit.append(conn, "x")


def _append_many(url: str, writer: int) -> None:
    eng = db.open_engine(url)
    for i in range(APPENDS_PER_WRITER):
        with db.write(eng) as conn:
            audit.append(conn, "concurrent", writer=writer, i=i)
    eng.dispose()


def test_concurrent_writers_in_several_processes(
    ledger_url: str, engine: Engine, key_path: Path, checkpoint_dir: Path
) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(ledger_url, w)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    audit.write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir)
    result = _verify(engine, key_path, checkpoint_dir)
    assert result.ok, result.message
    assert result.entries == WRITERS * APPENDS_PER_WRITER


def test_signing_key_is_private_and_stable(key_path: Path) -> None:
    key = audit.load_or_create_signing_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    again = audit.load_or_create_signing_key(key_path)
    assert again.private_bytes_raw() == key.private_bytes_raw()
    public = audit.load_public_key(audit.public_key_path_for(key_path))
    assert public.public_bytes_raw() == key.public_key().public_bytes_raw()

    key_path.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        audit.load_or_create_signing_key(key_path)


def test_verify_with_settings_anchors_a_fresh_log_and_needs_the_key_after(
    ledger_url: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), db={"url": ledger_url})
    eng = db.open_engine(settings.db_url)
    _fill(eng, 3)
    eng.dispose()
    # Nothing signed yet: the first verify signs the (intact) chain, then holds it to that checkpoint.
    first = audit.verify_with_settings(settings)
    assert first.ok and (first.entries, first.checkpoints) == (3, 1)
    # Once checkpoints exist, a missing public key is a failure, not a reason to re-anchor.
    audit.public_key_path_for(settings.audit_key_path).unlink()
    missing = audit.verify_with_settings(settings)
    assert not missing.ok and "public key" in missing.message and ".pub" in missing.message


def test_verify_with_settings_refuses_to_anchor_a_broken_chain(ledger_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), db={"url": ledger_url})
    eng = db.open_engine(settings.db_url)
    _fill(eng, 5)
    _attacker(eng, "UPDATE audit_log SET body = replace(body, 'event', 'evnt') WHERE seq = 3")
    eng.dispose()
    result = audit.verify_with_settings(settings)
    assert not result.ok
    assert not any(Path(settings.checkpoint_dir).glob("*.checkpoint"))
