"""Receive raw email into the ledger: parse, then one transaction (email + job + audit entry).

Bad email content never raises out of here: it is stored (capped) and sent to review with its
parse error. Only a ledger failure raises, so the caller leaves its source untouched and retries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.intake.parse import parse_email
from crewguard.crew.ledger import db, jobs
from crewguard.settings import Settings

log = logging.getLogger(__name__)

#: `source` value of emails added from files (`crewguard intake add`).
SOURCE_FILE = "file"


@dataclass(frozen=True)
class ReceiveResult:
    """The outcome of receiving one message.

    key: the email key (None when nothing could be read); duplicate: the key was already in the
    ledger, so nothing new was queued; parse_error: why the message went straight to review;
    source_ref: where it came from (a path, ...); error: why nothing was received at all
    (e.g. an unreadable file), else None.
    """

    key: str | None
    duplicate: bool
    parse_error: str | None
    source_ref: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the message is in the ledger (new or duplicate)."""
        return self.error is None


def receive_email(
    engine: Engine,
    raw: bytes,
    *,
    source: str,
    source_ref: str | None,
    settings: Settings,
    clock: Clock = SYSTEM_CLOCK,
) -> ReceiveResult:
    """Record one raw message and queue its job (or send it to review) in one ledger transaction.

    `source` names the intake (file, maildir, imap, rabbitmq); `source_ref` locates the message
    in it; `settings` gives the size cap (intake.max_message_bytes) and db.max_attempts.
    Raises only when the ledger itself fails.
    """
    cap = settings.intake.max_message_bytes
    parsed = parse_email(raw, max_bytes=cap)
    with db.write(engine) as conn:
        inserted = jobs.enqueue_email(
            conn,
            key=parsed.key,
            raw=raw[:cap],  # an oversize message is kept up to the cap, as evidence for review
            source=source,
            source_ref=source_ref,
            message_id=parsed.message_id,
            subject=parsed.subject,
            sender=parsed.sender,
            parse_error=parsed.parse_error,
            max_attempts=settings.db.max_attempts,
            clock=clock,
        )
    log.info(
        "email %s from %s: %s%s",
        parsed.key[:12],
        source,
        "new" if inserted else "duplicate",
        f" (to review: {parsed.parse_error})" if inserted and parsed.parse_error else "",
    )
    return ReceiveResult(
        key=parsed.key, duplicate=not inserted, parse_error=parsed.parse_error, source_ref=source_ref
    )


def receive_files(
    engine: Engine,
    paths: Iterable[str | os.PathLike[str]],
    *,
    settings: Settings,
    source: str = SOURCE_FILE,
    clock: Clock = SYSTEM_CLOCK,
) -> list[ReceiveResult]:
    """Receive each file as one message; a file that cannot be read is reported in its result."""
    results = []
    for path in paths:
        ref = str(Path(path).absolute())
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            results.append(
                ReceiveResult(
                    key=None,
                    duplicate=False,
                    parse_error=None,
                    source_ref=ref,
                    error=f"cannot read {ref}: {reason}",
                )
            )
            continue
        results.append(
            receive_email(engine, raw, source=source, source_ref=ref, settings=settings, clock=clock)
        )
    return results
