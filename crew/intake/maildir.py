"""Watch a maildir (or a plain folder of .eml files) and receive what arrives, ingest-then-ack.

A file is moved out of the way (maildir: new/ -> cur/ with the Seen flag; plain folder:
into processed/) only AFTER the ledger commit. A crash in between re-reads the file on the
next scan and the email key absorbs the duplicate (research/reliability.md §5).
The daemon calls `scan_once()` every `intake.maildir.poll_s`; there is no thread here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.intake.receive import ReceiveResult, receive_email
from crewguard.settings import Settings

log = logging.getLogger(__name__)

#: `source` value of emails taken from the watched folder.
SOURCE_MAILDIR = "maildir"
#: In a plain folder, a file modified this recently may still be being written: wait for it.
SETTLE_S = 1.0
#: Plain-folder files that are picked up (compared case-insensitively).
EML_SUFFIX = ".eml"
#: Plain-folder subfolder that receives files once their email is in the ledger.
PROCESSED_DIR = "processed"
#: Maildir info appended when a message moves to cur/: version 2, flag Seen.
MAILDIR_SEEN_INFO = ":2,S"


class MaildirWatcher:
    """Receives the messages in settings.intake.maildir.path into the ledger, one scan at a time."""

    name = SOURCE_MAILDIR  # the daemon's Intake protocol (crew/workers/daemon.py)

    def __init__(self, engine: Engine, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        """`engine`: the ledger; `settings`: folder path, size cap, max attempts; `clock`: for file ages."""
        self._engine = engine
        self._settings = settings
        self._clock = clock
        configured = settings.intake.maildir.path
        self.path: Path | None = Path(configured).expanduser() if configured else None
        self._warned_missing = False

    @property
    def is_maildir(self) -> bool:
        """True for a real maildir (it has new/); False for a plain folder of .eml files."""
        return self.path is not None and (self.path / "new").is_dir()

    def scan_once(self) -> list[ReceiveResult]:
        """Receive every complete message waiting in the folder; returns one result per file read.

        A ledger failure stops the scan and leaves the remaining files in place for the next one.
        """
        if self.path is None:
            return []
        if not self.path.is_dir():
            if not self._warned_missing:
                log.warning("maildir %s does not exist (yet): nothing to watch", self.path)
                self._warned_missing = True
            return []
        self._warned_missing = False
        results: list[ReceiveResult] = []
        for file in self._waiting_files():
            try:
                raw = file.read_bytes()
            except FileNotFoundError:
                continue  # taken by another watcher meanwhile
            except OSError as exc:
                error = f"cannot read {file}: {exc.strerror or type(exc).__name__}"
                log.warning("%s (left in place)", error)
                results.append(
                    ReceiveResult(
                        key=None, duplicate=False, parse_error=None, source_ref=str(file), error=error
                    )
                )
                continue
            try:
                result = receive_email(
                    self._engine,
                    raw,
                    source=SOURCE_MAILDIR,
                    source_ref=str(file),
                    settings=self._settings,
                    clock=self._clock,
                )
            except SQLAlchemyError as exc:
                log.warning("ledger unavailable, maildir scan stopped: %s", type(exc).__name__)
                break
            results.append(result)
            self._mark_processed(file)
        return results

    def poll(self) -> int:
        """One scan for the daemon loop; returns how many new emails were queued or sent to review."""
        return sum(1 for result in self.scan_once() if result.ok and not result.duplicate)

    # ------------------------------------------------------------------ folder layouts

    def _waiting_files(self) -> list[Path]:
        assert self.path is not None
        if self.is_maildir:
            # Delivery renames complete messages into new/ (atomic), so all of new/ is ready.
            return sorted(p for p in _entries(self.path / "new") if not p.name.startswith("."))
        settled_before = self._clock.now() - SETTLE_S
        ready = []
        for entry in _entries(self.path):
            if entry.name.startswith(".") or not entry.name.lower().endswith(EML_SUFFIX):
                continue
            try:
                if entry.stat().st_mtime > settled_before:
                    continue  # still being written
            except OSError:
                continue
            ready.append(entry)
        return sorted(ready)

    def _mark_processed(self, file: Path) -> None:
        """Move a received file out of the way; on failure the next scan re-reads it (a duplicate)."""
        assert self.path is not None
        if file.parent.name == "new" and file.parent.parent == self.path:
            target = self.path / "cur" / (file.name.partition(":2,")[0] + MAILDIR_SEEN_INFO)
        else:
            target = _free_name(self.path / PROCESSED_DIR / file.name)
        try:
            target.parent.mkdir(exist_ok=True)
            os.rename(file, target)
        except FileNotFoundError:
            pass  # already moved by another watcher
        except OSError as exc:
            log.warning("could not move %s to %s: %s", file, target.parent, exc.strerror or exc)


def _entries(folder: Path) -> list[Path]:
    """Regular files directly in `folder` (an unreadable folder yields nothing)."""
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc.strerror or exc)
        return []


def _free_name(target: Path) -> Path:
    """`a.eml`, or `a.1.eml`, `a.2.eml`, ... when a file of that name was processed before."""
    candidate, n = target, 0
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
    return candidate
