"""Tamper-evident audit log: an append-only hash chain in the ledger, anchored by signed checkpoints.

entry_hash = sha256("audit-v1\\0" || seq (8 bytes, big endian) || prev_hash || sha256(body)).
Entries are written in the same transaction as the state change they describe.

Checkpoints live OUTSIDE the database, one file per checkpoint (`<seq, 12 digits>.checkpoint`),
in the C2SP signed-note format (c2sp.org/signed-note, tlog-checkpoint-like body):

    crewguard/audit-v1              <- origin
    1000                            <- seq of the last entry covered
    9f2c...e1 (64 hex)              <- that entry's entry_hash (hex, as stored; C2SP uses base64)
    1700000000.000                  <- signing time, epoch seconds
                                    <- blank line
    — crewguard-audit <base64(key id (4 bytes) || Ed25519 signature (64 bytes))>

The signature covers the four body lines (with their newlines); key id = sha256(name || "\\n" ||
0x01 || public key)[:4] as in signed-note. The chain alone detects edits and deletions; a signed
checkpoint also detects truncation and a full rewrite (recomputed hashes) below the checkpoint.
Entries appended after the last checkpoint can still be cut off unnoticed: checkpoint often, and
copy checkpoints off the box.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, Row, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import audit_log

if TYPE_CHECKING:
    from crewguard.settings import Settings

GENESIS_HASH = "0" * 64
HASH_DOMAIN = b"audit-v1\0"
#: pg_advisory_xact_lock key that serializes appenders across processes on PostgreSQL.
PG_APPEND_LOCK_KEY = 727002
#: First line of every checkpoint: names this log and its format version.
CHECKPOINT_ORIGIN = "crewguard/audit-v1"
#: Signer name on the checkpoint signature line (no spaces or '+', per signed-note).
SIGNER_NAME = "crewguard-audit"
#: File name suffix of checkpoint files; temporary files never end with it.
CHECKPOINT_SUFFIX = ".checkpoint"
#: Rows read per query while verifying, so memory stays bounded on any log size.
VERIFY_BATCH_SIZE = 2000
#: Signed-note signature type byte for Ed25519.
_ED25519_SIG_TYPE = b"\x01"
#: Signed-note signature line prefix (an em dash and a space).
_SIG_PREFIX = "\u2014 "
#: The ts column and the ts inside the hashed body may differ by the body's 6-decimal rounding.
_TS_TOLERANCE_S = 1e-6


class AuditIntegrityError(Exception):
    """The log no longer matches itself or its last checkpoint: refuse to sign it."""


# --- the chain -------------------------------------------------------------------------------------


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
    """Append one entry inside the caller's write transaction (`db.write`); returns its sequence number.

    Safe with concurrent writers in several processes: SQLite's BEGIN IMMEDIATE (db.write) and a
    transaction-scoped advisory lock on PostgreSQL make appenders take turns until commit.
    """
    if conn.get_execution_options().get("readonly", False):
        raise ValueError("audit.append needs a write transaction (db.write), not db.read")
    if conn.dialect.name != "sqlite":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_APPEND_LOCK_KEY})
    ts = clock.now()
    body = canonical_json({"event": event, "email_key": email_key, "ts": round(ts, 6), **data})
    seq, prev = head(conn)
    seq += 1
    conn.execute(
        audit_log.insert().values(
            seq=seq, ts=ts, body=body, prev_hash=prev, entry_hash=entry_hash(seq, prev, body)
        )
    )
    return seq


def head(conn: Connection) -> tuple[int, str]:
    """(seq, entry_hash) of the last entry, or (0, GENESIS_HASH) for an empty log."""
    last = conn.execute(
        select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)
    ).first()
    return (last.seq, last.entry_hash) if last else (0, GENESIS_HASH)


def count(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(audit_log)).scalar_one()


def _iter_entries(engine: Engine, *, after_seq: int, batch_size: int) -> Iterator[Row[Any]]:
    """Entries with seq > after_seq in order, fetched `batch_size` rows at a time (keyset paging)."""
    cols = (audit_log.c.seq, audit_log.c.ts, audit_log.c.body, audit_log.c.prev_hash, audit_log.c.entry_hash)
    last = after_seq
    while True:
        with db.read(engine) as conn:
            rows = conn.execute(
                select(*cols).where(audit_log.c.seq > last).order_by(audit_log.c.seq).limit(batch_size)
            ).all()
        yield from rows
        if len(rows) < batch_size:
            return
        last = rows[-1].seq


@dataclass
class _Fault:
    seq: int | None  # the first bad entry, None for a problem with a checkpoint file
    message: str


@dataclass
class _ChainWalker:
    """Recomputes the chain one entry at a time; remembers only the previous hash."""

    expected: int = 1
    prev: str = GENESIS_HASH
    checked: int = 0

    def feed(self, row: Row[Any]) -> _Fault | None:
        seq = row.seq
        if seq != self.expected:
            gap = (
                f"entry {self.expected}"
                if seq == self.expected + 1
                else f"entries {self.expected}..{seq - 1}"
            )
            return _Fault(self.expected, f"{gap} missing (deleted)")
        fault = self._check(row)
        if fault:
            return fault
        self.prev = row.entry_hash
        self.expected += 1
        self.checked += 1
        return None

    def _check(self, row: Row[Any]) -> _Fault | None:
        seq = row.seq
        recomputed = entry_hash(seq, self.prev, row.body)
        if recomputed != row.entry_hash:
            if row.prev_hash != self.prev and _safe_hash(seq, row.prev_hash, row.body) == row.entry_hash:
                # Self-consistent entry chained to a hash the log no longer holds: its predecessor changed.
                if seq == 1:
                    return _Fault(1, "entry 1: does not start from the genesis hash (rewritten)")
                return _Fault(seq - 1, f"entry {seq - 1}: rewritten (entry {seq} chains to a different hash)")
            return _Fault(seq, f"entry {seq}: hash mismatch (entry edited)")
        if row.prev_hash != self.prev:
            return _Fault(seq, f"entry {seq}: prev_hash edited")
        try:
            body_ts = json.loads(row.body)["ts"]
            ts_ok = abs(float(body_ts) - float(row.ts)) <= _TS_TOLERANCE_S
        except (ValueError, TypeError, KeyError):
            return _Fault(seq, f"entry {seq}: body is not an audit JSON object (entry edited)")
        if not ts_ok:
            return _Fault(seq, f"entry {seq}: ts column differs from the hashed body (entry edited)")
        return None


def _safe_hash(seq: int, prev_hash: str, body: str) -> str | None:
    try:
        return entry_hash(seq, prev_hash, body)
    except ValueError:  # prev_hash is not hex
        return None


# --- signing keys ----------------------------------------------------------------------------------


def public_key_path_for(key_path: str | os.PathLike[str]) -> Path:
    """Where the public half of the signing key at `key_path` lives: `<key_path>.pub`."""
    path = Path(key_path)
    return path.with_name(path.name + ".pub")


def load_or_create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 signing key at `path` (PEM, mode 0600), created with `<path>.pub` on first use.

    Two processes starting together end up with the same key: creation never overwrites.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with contextlib.suppress(FileExistsError):  # another process won the race: use its key
            _write_atomic(path, pem, mode=0o600, overwrite=False)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"signing key {path} is readable by others (mode {mode:04o}); chmod 600 it")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {path} is not an Ed25519 private key")
    pub_path = public_key_path_for(path)
    pub_pem = _public_pem(key.public_key())
    if not pub_path.exists() or pub_path.read_bytes() != pub_pem:
        _write_atomic(pub_path, pub_pem, mode=0o644)
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """The Ed25519 public key (PEM) that checkpoints are verified with."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key {path} is not an Ed25519 public key")
    return key


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_id(name: str, key: Ed25519PublicKey) -> bytes:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + _ED25519_SIG_TYPE + raw).digest()[:4]


def _write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool = True) -> None:
    """Write via a temp file in the same folder, fsync, then rename (or link, to never overwrite)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # raises FileExistsError instead of replacing
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# --- checkpoints -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One signed statement: entry `seq` of log `origin` had hash `entry_hash` at `time`."""

    origin: str
    seq: int
    entry_hash: str
    time: float
    path: Path | None = None

    def note_body(self) -> str:
        return f"{self.origin}\n{self.seq}\n{self.entry_hash}\n{self.time:.3f}\n"


class CheckpointError(Exception):
    """A checkpoint file that is malformed or not signed by our key."""


def sign_checkpoint(checkpoint: Checkpoint, key: Ed25519PrivateKey, *, name: str = SIGNER_NAME) -> str:
    """The signed-note text of `checkpoint`."""
    body = checkpoint.note_body()
    sig = _key_id(name, key.public_key()) + key.sign(body.encode("utf-8"))
    return f"{body}\n{_SIG_PREFIX}{name} {base64.b64encode(sig).decode('ascii')}\n"


def parse_checkpoint(
    note: str, key: Ed25519PublicKey, *, name: str = SIGNER_NAME, path: Path | None = None
) -> Checkpoint:
    """Parse and verify a signed note; raise CheckpointError saying what is wrong."""
    body, sep, sig_block = note.partition("\n\n")
    if not sep:
        raise CheckpointError("malformed (no blank line before the signature)")
    body += "\n"
    lines = body.splitlines()
    if len(lines) != 4:
        raise CheckpointError(f"malformed (expected 4 body lines, found {len(lines)})")
    origin, seq_s, hash_s, time_s = lines
    try:
        seq, ts = int(seq_s), float(time_s)
        bytes.fromhex(hash_s)
    except ValueError:
        raise CheckpointError("malformed (seq, entry hash or time unreadable)") from None
    if seq < 1 or len(hash_s) != 64:
        raise CheckpointError("malformed (seq or entry hash out of range)")
    want_id = _key_id(name, key)
    for line in sig_block.splitlines():
        if not line.startswith(_SIG_PREFIX + name + " "):
            continue
        try:
            sig = base64.b64decode(line.rsplit(" ", 1)[1], validate=True)
        except ValueError:
            continue
        if sig[:4] != want_id or len(sig) != 68:
            continue
        try:
            key.verify(sig[4:], body.encode("utf-8"))
        except InvalidSignature:
            raise CheckpointError("bad signature") from None
        if origin != CHECKPOINT_ORIGIN:
            raise CheckpointError(f"origin {origin!r} is not {CHECKPOINT_ORIGIN!r}")
        return Checkpoint(origin=origin, seq=seq, entry_hash=hash_s, time=ts, path=path)
    raise CheckpointError("bad signature (no signature by our key)")


def _checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if p.name.endswith(CHECKPOINT_SUFFIX))


def _load_checkpoints(checkpoint_dir: Path, key: Ed25519PublicKey) -> tuple[list[Checkpoint], list[_Fault]]:
    good: list[Checkpoint] = []
    faults: list[_Fault] = []
    for path in _checkpoint_files(checkpoint_dir):
        try:
            good.append(parse_checkpoint(path.read_text("utf-8"), key, path=path))
        except (CheckpointError, OSError, UnicodeDecodeError) as exc:
            faults.append(_Fault(None, f"checkpoint {path.name}: {exc}"))
    return good, faults


def last_checkpoint(checkpoint_dir: str | os.PathLike[str], key: Ed25519PublicKey) -> Checkpoint | None:
    """The validly signed checkpoint with the highest seq, or None (reads files newest first)."""
    for path in reversed(_checkpoint_files(Path(checkpoint_dir))):  # zero-padded names sort by seq
        try:
            return parse_checkpoint(path.read_text("utf-8"), key, path=path)
        except (CheckpointError, OSError, UnicodeDecodeError):
            continue  # verify() reports it; here we only need the newest good one
    return None


def write_checkpoint(
    engine: Engine,
    *,
    key_path: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    clock: Clock = SYSTEM_CLOCK,
) -> Path | None:
    """Sign the log's head into `checkpoint_dir`; None when nothing was appended since the last one.

    Checks the entries since the last checkpoint first and raises AuditIntegrityError rather
    than sign a chain that no longer holds (the daemon should page on it, not crash).
    """
    key = load_or_create_signing_key(key_path)
    checkpoint_dir = Path(checkpoint_dir)
    previous = last_checkpoint(checkpoint_dir, key.public_key())
    with db.read(engine) as conn:
        seq, head_hash = head(conn)
    if seq == 0 or (previous and previous.seq >= seq):
        return None
    _check_segment(engine, previous, up_to=seq)
    checkpoint = Checkpoint(origin=CHECKPOINT_ORIGIN, seq=seq, entry_hash=head_hash, time=clock.now())
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / f"{seq:012d}{CHECKPOINT_SUFFIX}"
    _write_atomic(path, sign_checkpoint(checkpoint, key).encode("utf-8"), mode=0o644)
    return path


def maybe_checkpoint(
    engine: Engine,
    *,
    key_path: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    every: int,
    clock: Clock = SYSTEM_CLOCK,
) -> Path | None:
    """Write a checkpoint when at least `every` entries were appended since the last one."""
    key = load_or_create_signing_key(key_path)
    previous = last_checkpoint(checkpoint_dir, key.public_key())
    with db.read(engine) as conn:
        seq, _ = head(conn)
    if seq - (previous.seq if previous else 0) < max(1, every):
        return None
    return write_checkpoint(engine, key_path=key_path, checkpoint_dir=checkpoint_dir, clock=clock)


def _check_segment(engine: Engine, previous: Checkpoint | None, *, up_to: int) -> None:
    """Recompute the chain from `previous` (or seq 1) to `up_to`; raise AuditIntegrityError if broken."""
    walker = _ChainWalker()
    if previous:
        with db.read(engine) as conn:
            anchor = conn.execute(
                select(audit_log.c.entry_hash).where(audit_log.c.seq == previous.seq)
            ).scalar_one_or_none()
        if anchor != previous.entry_hash:
            raise AuditIntegrityError(
                f"entry {previous.seq} differs from signed checkpoint (rewritten or truncated); "
                "run `crewguard audit verify`"
            )
        walker = _ChainWalker(expected=previous.seq + 1, prev=previous.entry_hash)
    for row in _iter_entries(engine, after_seq=walker.expected - 1, batch_size=VERIFY_BATCH_SIZE):
        if row.seq > up_to:
            break
        fault = walker.feed(row)
        if fault:
            raise AuditIntegrityError(f"{fault.message}; run `crewguard audit verify`")
    if walker.expected <= up_to:
        raise AuditIntegrityError(f"entry {walker.expected} missing (deleted)")


# --- verification ----------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    ok: bool
    entries: int  # entries verified (up to the first bad one)
    checkpoints: int  # checkpoint files with a valid signature
    first_bad_seq: int | None  # the first bad entry; None when intact or only a checkpoint file is bad
    message: str
    problems: list[str] = field(default_factory=list)  # every problem found, first bad entry first


def verify(
    engine: Engine,
    *,
    checkpoint_dir: str | os.PathLike[str],
    public_key_path: str | os.PathLike[str],
    batch_size: int = VERIFY_BATCH_SIZE,
) -> VerifyResult:
    """Recompute the whole chain from seq 1 and hold it against every signed checkpoint.

    Streams `batch_size` entries at a time. Detects edited entries (hash mismatch), deleted
    entries (seq gap), truncation and rewrites below a checkpoint, and forged checkpoint files.
    """
    try:
        key = load_public_key(public_key_path)
    except (OSError, ValueError) as exc:
        message = f"public key {public_key_path}: {exc.strerror if isinstance(exc, OSError) else exc}"
        return VerifyResult(False, 0, 0, None, message, [message])
    checkpoints, file_faults = _load_checkpoints(Path(checkpoint_dir), key)
    by_seq: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints:
        by_seq.setdefault(cp.seq, []).append(cp)

    walker = _ChainWalker()
    entry_fault: _Fault | None = None
    try:
        for row in _iter_entries(engine, after_seq=0, batch_size=batch_size):
            entry_fault = walker.feed(row) or _against_checkpoints(row, by_seq.get(row.seq, ()))
            if entry_fault:
                break
    except SQLAlchemyError as exc:
        message = f"cannot read the audit log: {type(exc.orig or exc).__name__}: {str(exc.orig or exc).splitlines()[0]}"
        return VerifyResult(False, walker.checked, len(checkpoints), None, message, [message])
    if entry_fault is None and checkpoints:
        last = walker.expected - 1
        top = max(cp.seq for cp in checkpoints)
        if top > last:
            entry_fault = _Fault(last + 1, f"log ends at {last} but checkpoint says {top} (truncated)")

    problems = ([entry_fault.message] if entry_fault else []) + [f.message for f in file_faults]
    if problems:
        message = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    else:
        message = f"{walker.checked} entries, {len(checkpoints)} checkpoints verified"
        if not checkpoints and walker.checked:
            message += " (no checkpoint yet: a rewrite of the whole log would go unnoticed)"
    return VerifyResult(
        ok=not problems,
        entries=walker.checked,
        checkpoints=len(checkpoints),
        first_bad_seq=entry_fault.seq if entry_fault else None,
        message=message,
        problems=problems,
    )


def _against_checkpoints(row: Row[Any], checkpoints: Sequence[Checkpoint]) -> _Fault | None:
    for cp in checkpoints:
        if cp.entry_hash != row.entry_hash:
            name = cp.path.name if cp.path else "?"
            return _Fault(row.seq, f"entry {row.seq} differs from signed checkpoint {name} (rewritten)")
    return None


def verify_with_settings(settings: Settings) -> VerifyResult:
    """`crewguard audit verify`: the configured ledger against the configured checkpoints and key."""
    from crewguard.crew.ledger.db import open_engine

    engine = open_engine(settings.db_url, create=False)
    try:
        public_key = public_key_path_for(settings.audit_key_path)
        if not public_key.exists() and not any(Path(settings.checkpoint_dir).glob("*.checkpoint")):
            # Nothing signed yet: anchor the log now (write_checkpoint refuses to sign a broken chain).
            try:
                write_checkpoint(engine, key_path=settings.audit_key_path, checkpoint_dir=settings.checkpoint_dir)
            except AuditIntegrityError:
                pass  # verify below reports the first bad entry
        return verify(
            engine,
            checkpoint_dir=settings.checkpoint_dir,
            public_key_path=public_key_path_for(settings.audit_key_path),
        )
    finally:
        engine.dispose()


def format_result(result: VerifyResult) -> str:
    """For humans: `audit log intact: ...`, or `audit log check FAILED: <first problem>` then the rest."""
    if result.ok:
        return f"audit log intact: {result.message}"
    lines = [f"audit log check FAILED: {result.problems[0] if result.problems else result.message}"]
    lines += [f"  also: {p}" for p in result.problems[1:]]
    return "\n".join(lines)
