"""Tamper-evident audit log: an append-only hash chain over canonical JSON in the ledger.

entry_hash = sha256("audit-v1\\0" || seq (8 bytes, big endian) || prev_hash || sha256(body)).
Entries are written in the same transaction as the state change they describe.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Connection, func, select, text

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger.schema import audit_log

GENESIS_HASH = "0" * 64
HASH_DOMAIN = b"audit-v1\0"


def canonical_json(body: dict[str, Any]) -> str:
    """Sorted keys, no whitespace, UTF-8: the same dict always gives the same bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(seq: int, prev_hash: str, body: str) -> str:
    body_digest = hashlib.sha256(body.encode("utf-8")).digest()
    return hashlib.sha256(
        HASH_DOMAIN + seq.to_bytes(8, "big") + bytes.fromhex(prev_hash) + body_digest
    ).hexdigest()


def install_guards(conn: Connection) -> None:
    """Make the audit table append-only at the database level (UPDATE and DELETE raise)."""
    if conn.dialect.name == "sqlite":
        for op in ("UPDATE", "DELETE"):
            conn.execute(
                text(
                    f"CREATE TRIGGER IF NOT EXISTS audit_log_no_{op.lower()} BEFORE {op} ON audit_log "
                    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
                )
            )
    else:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END; $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log"))
        conn.execute(
            text(
                "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log "
                "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
            )
        )


def append(
    conn: Connection, event: str, *, email_key: str | None = None, clock: Clock = SYSTEM_CLOCK, **data: Any
) -> int:
    """Append one entry inside the caller's transaction; returns its sequence number."""
    if conn.dialect.name != "sqlite":
        # Serialize appenders; SQLite's BEGIN IMMEDIATE already does.
        conn.execute(text("SELECT pg_advisory_xact_lock(727002)"))
    ts = clock.now()
    body = canonical_json({"event": event, "email_key": email_key, "ts": round(ts, 6), **data})
    last = conn.execute(
        select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
    ).first()
    seq = (last.seq + 1) if last else 1
    prev = last.entry_hash if last else GENESIS_HASH
    conn.execute(
        audit_log.insert().values(
            seq=seq, ts=ts, body=body, prev_hash=prev, entry_hash=entry_hash(seq, prev, body)
        )
    )
    return seq


def count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
