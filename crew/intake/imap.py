"""Receive email from an IMAP folder into the ledger, ingest-then-ack (research/reliability.md §5).

One background thread keeps one connection. It fetches new messages by UID with BODY.PEEK[]
(nothing gets marked read), records each in the ledger, and only then flags or moves it and
advances the cursor (UIDVALIDITY, last UID) in intake_cursors. A crash anywhere in between
re-fetches, and the email key absorbs the duplicate. A UIDVALIDITY change rescans the whole
folder for the same reason. IDLE wakes the thread when mail arrives; a scan at least every
`poll_s` is the correctness path. The daemon's poll() only collects what the thread received.
"""

from __future__ import annotations

import imaplib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imap_tools import BaseMailBox, MailBox, MailBoxStartTls, MailBoxUnencrypted
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.intake import cursors
from crewguard.crew.intake.receive import ReceiveResult, receive_email
from crewguard.retry import RetryPolicy
from crewguard.settings import ImapSettings, Settings

log = logging.getLogger(__name__)

#: `source` value of emails taken from IMAP.
SOURCE_IMAP = "imap"
#: Socket timeout of every IMAP command (IDLE waits are sliced below it).
IO_TIMEOUT_S = 30.0
#: At most this many message bodies per UID FETCH.
FETCH_BATCH = 50
#: At most this many bytes of message bodies per UID FETCH (one oversize message still goes alone).
FETCH_BATCH_BYTES = 32 * 1024 * 1024
#: IDLE is polled in slices this long, so close() is honoured promptly.
IDLE_SLICE_S = 1.0
#: First reconnect backoff is drawn from [0, this]; it doubles up to settings' reconnect_cap_s.
RECONNECT_BASE_S = 1.0
#: close() waits this long for the thread to finish its current step.
JOIN_TIMEOUT_S = 15.0
#: The state keeps the UIDs of the last this-many messages the ledger refused.
SET_ASIDE_KEPT = 20

_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_IDLE_WAKE = (b"EXISTS", b"BYE")


@dataclass(frozen=True)
class MessageInfo:
    """What the server says about a message before its body is fetched."""

    uid: int
    size: int
    internal_date: float | None


class ImapConfigError(Exception):
    """The intake cannot even try to connect (e.g. the password variable is not set)."""


class ImapIntake:
    """Receives settings.intake.imap.folder into the ledger from a background thread."""

    name = SOURCE_IMAP  # the daemon's Intake protocol (crew/workers/daemon.py)

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        after_commit: Callable[[ReceiveResult], None] | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """`engine`: the ledger; `settings`: intake.imap plus the size cap and max attempts;
        `clock`: timestamps; `after_commit`: called after each ledger commit, before the server
        is told (a seam for crash tests); `environ`: where the password variable is read."""
        self._engine = engine
        self._settings = settings
        self._cfg: ImapSettings = settings.intake.imap
        self._clock = clock
        self._after_commit = after_commit
        self._environ = environ
        self._retry = RetryPolicy(max_attempts=1, base_s=RECONNECT_BASE_S, cap_s=self._cfg.reconnect_cap_s)
        self._mailbox: BaseMailBox | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._new_since_poll = 0
        self._received_total = 0
        self._set_aside: list[int] = []

    @property
    def source(self) -> str:
        """The intake_cursors key of this mailbox folder."""
        c = self._cfg
        return f"{SOURCE_IMAP}:{c.username}@{c.host}:{c.port}/{c.folder}"

    # ------------------------------------------------------------------ daemon protocol

    def poll(self) -> int:
        """Start the thread if needed; returns how many new emails it queued since the last poll."""
        if self._thread is None or not self._thread.is_alive():
            self.start()
        with self._lock:
            count, self._new_since_poll = self._new_since_poll, 0
        return count

    def start(self) -> None:
        """Run the receive loop in a daemon thread (until close())."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"intake {self.source}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and log out (safe to call more than once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            self._thread = None
        self._disconnect()

    # ------------------------------------------------------------------ one step, synchronously

    def sync_once(self) -> list[ReceiveResult]:
        """Connect if needed and receive every new message once; for tests and one-shot use.

        Raises on IMAP errors (after dropping the connection) and on ledger outages. Do not mix
        with the thread (poll()/start()).
        """
        try:
            if self._mailbox is None:
                self._connect()
            return self._scan()
        except SQLAlchemyError:
            raise
        except Exception:
            self._disconnect()
            raise

    def wait_for_mail(self, timeout_s: float) -> bool:
        """Wait in IDLE (or plain sleep) up to `timeout_s`; True when the server announced mail."""
        mailbox = self._mailbox
        if mailbox is None or "IDLE" not in mailbox.client.capabilities:
            self._stop.wait(timeout_s)
            return False
        deadline = time.monotonic() + timeout_s
        arrived = False
        mailbox.idle.start()
        try:
            while not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                slice_s = min(IDLE_SLICE_S, remaining)
                started = time.monotonic()
                lines = mailbox.idle.poll(timeout=slice_s)
                if any(wake in line for line in lines for wake in _IDLE_WAKE):
                    arrived = True
                    break
                if not lines and time.monotonic() - started < slice_s / 2:
                    break  # readable yet nothing to read: the server hung up (DONE below will tell)
        finally:
            mailbox.idle.stop()  # raises when the connection is gone: the caller reconnects
        return arrived

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.sync_once()
                failures = 0
                self.wait_for_mail(min(self._cfg.poll_s, self._cfg.idle_s))
            except Exception as exc:  # a failing server or ledger degrades the intake, never the daemon
                failures += 1
                delay = self._retry.backoff(failures)
                if not isinstance(exc, SQLAlchemyError):
                    self._disconnect()
                error = self._describe(exc)
                log.warning("IMAP intake %s: %s; retrying in %.1f s", self.source, error, delay)
                self._report(
                    connected=self._mailbox is not None, last_error=error, retry_in_s=round(delay, 3)
                )
                self._stop.wait(delay)

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        cfg = self._cfg
        password = self._environ.get(cfg.password_env)
        if not password:
            raise ImapConfigError(f"environment variable {cfg.password_env} (the IMAP password) is not set")
        mailbox = _open_mailbox(cfg)
        try:
            mailbox.login(cfg.username, password, initial_folder=None)
            _refresh_capabilities(mailbox)
            if cfg.processed == "move" and not mailbox.folder.exists(cfg.processed_folder):
                mailbox.folder.create(cfg.processed_folder)
        except BaseException:
            _quiet_logout(mailbox)
            raise
        self._mailbox = mailbox
        log.info("IMAP intake connected to %s:%s, folder %s", cfg.host, cfg.port, cfg.folder)

    def _disconnect(self) -> None:
        mailbox, self._mailbox = self._mailbox, None
        if mailbox is not None:
            _quiet_logout(mailbox)

    # ------------------------------------------------------------------ scanning

    def _scan(self) -> list[ReceiveResult]:
        """Receive every message above the cursor (all of them after a UIDVALIDITY change)."""
        mailbox = self._mailbox
        assert mailbox is not None
        # SELECT again on every scan: a session keeps seeing a folder deleted and recreated under it.
        uidvalidity, exists = _select(mailbox, self._cfg.folder)
        cursor = cursors.get_cursor(self._engine, self.source)
        last_uid = 0
        if cursor is not None and cursor.uidvalidity == uidvalidity:
            last_uid = cursor.last_uid or 0
        elif cursor is not None and cursor.uidvalidity is not None:
            log.warning(
                "IMAP %s: UIDVALIDITY changed %s -> %s, rescanning the folder",
                self.source,
                cursor.uidvalidity,
                uidvalidity,
            )
        waiting = self._list_new(mailbox, last_uid)
        if not waiting and (cursor is None or cursor.uidvalidity != uidvalidity):
            cursors.save_position(
                self._engine, self.source, uidvalidity=uidvalidity, last_uid=last_uid, clock=self._clock
            )
        if waiting:
            self._report(pending=len(waiting))
        results: list[ReceiveResult] = []
        for batch in _batches(waiting, self._settings.intake.max_message_bytes):
            results.extend(self._receive_batch(mailbox, batch, uidvalidity))
        self._report(
            connected=True,
            uidvalidity=uidvalidity,
            messages=exists,
            pending=0,
            last_scan_at=self._clock.now(),
            last_error=None,
            retry_in_s=None,
        )
        return results

    def _list_new(self, mailbox: BaseMailBox, last_uid: int) -> list[MessageInfo]:
        """UIDs, sizes and arrival times above `last_uid` (`n:*` always matches the highest UID)."""
        typ, data = mailbox.client.uid("FETCH", f"{last_uid + 1}:*", "(UID RFC822.SIZE INTERNALDATE)")
        if typ != "OK":
            raise imaplib.IMAP4.error(f"UID FETCH sizes failed: {typ}")
        found: dict[int, MessageInfo] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes):
                continue
            uid, size = _UID.search(line), _SIZE.search(line)
            if uid is None or size is None or int(uid[1]) <= last_uid:
                continue
            when = imaplib.Internaldate2tuple(line)
            found[int(uid[1])] = MessageInfo(int(uid[1]), int(size[1]), time.mktime(when) if when else None)
        return [found[uid] for uid in sorted(found)]

    def _receive_batch(
        self, mailbox: BaseMailBox, batch: list[MessageInfo], uidvalidity: int
    ) -> list[ReceiveResult]:
        """Ledger first, then flag/move, then the cursor; an outage stops after what was done."""
        raws = self._fetch_bodies(mailbox, batch)
        results: list[ReceiveResult] = []
        done: list[int] = []  # handled in order: received, refused, or gone from the server
        received: list[int] = []  # in the ledger: to be flagged or moved
        outage: SQLAlchemyError | None = None
        for info in batch:
            raw = raws.get(info.uid)
            if raw is None:  # expunged meanwhile (by another client): nothing to receive
                done.append(info.uid)
                continue
            try:
                result = receive_email(
                    self._engine,
                    raw,
                    source=SOURCE_IMAP,
                    source_ref=self._ref(uidvalidity, info.uid),
                    settings=self._settings,
                    clock=self._clock,
                )
            except Exception as exc:
                if isinstance(exc, SQLAlchemyError) and cursors.is_ledger_outage(exc):
                    outage = exc
                    break
                # The ledger refuses this one message: leave it unflagged on the server, move on.
                log.error(
                    "IMAP %s UID %s refused by the ledger: %s", self.source, info.uid, self._describe(exc)
                )
                self._set_aside = [*self._set_aside, info.uid][-SET_ASIDE_KEPT:]
                done.append(info.uid)
                continue
            if self._after_commit is not None:
                self._after_commit(result)
            results.append(result)
            received.append(info.uid)
            done.append(info.uid)
        if received:
            self._mark_processed(mailbox, received)
        if done:
            cursors.save_position(
                self._engine, self.source, uidvalidity=uidvalidity, last_uid=done[-1], clock=self._clock
            )
        self._count(results, batch)
        if outage is not None:
            raise outage
        return results

    def _fetch_bodies(self, mailbox: BaseMailBox, batch: list[MessageInfo]) -> dict[int, bytes]:
        """Raw bytes per UID; an oversize message is fetched only up to cap + 1 (receive flags it)."""
        cap = self._settings.intake.max_message_bytes
        whole = [i.uid for i in batch if i.size <= cap]
        raws: dict[int, bytes] = {}
        if whole:
            raws.update(_fetch(mailbox, ",".join(map(str, whole)), "BODY.PEEK[]"))
        for info in batch:
            if info.size > cap:
                raws.update(_fetch(mailbox, str(info.uid), f"BODY.PEEK[]<0.{cap + 1}>"))
        return raws

    def _mark_processed(self, mailbox: BaseMailBox, uids: list[int]) -> None:
        ids = [str(uid) for uid in uids]
        if self._cfg.processed == "move":
            mailbox.move(ids, self._cfg.processed_folder)
        else:
            mailbox.flag(ids, self._cfg.processed_flag, True)

    # ------------------------------------------------------------------ reporting

    def _ref(self, uidvalidity: int, uid: int) -> str:
        """An RFC 5092 IMAP URL of the message."""
        c = self._cfg
        return f"imap://{c.username}@{c.host}:{c.port}/{c.folder};UIDVALIDITY={uidvalidity}/;UID={uid}"

    def _count(self, results: list[ReceiveResult], batch: list[MessageInfo]) -> None:
        new = [r for r in results if not r.duplicate]
        with self._lock:
            self._new_since_poll += len(new)
            self._received_total += len(new)
        if not results:
            return
        now = self._clock.now()
        arrived = batch[-1].internal_date
        self._report(
            last_message_at=now,
            lag_s=round(max(0.0, now - arrived), 3) if arrived is not None else None,
            received=self._received_total,
            set_aside=self._set_aside,
        )

    def _report(self, **fields: Any) -> None:
        """Merge `fields` into this intake's state row; a ledger outage only costs the report."""
        try:
            cursors.update_state(self._engine, self.source, self._clock, **fields)
        except SQLAlchemyError as exc:
            log.debug("IMAP %s: state not recorded: %s", self.source, type(exc).__name__)

    def _describe(self, exc: BaseException) -> str:
        """`Type: message` with the password, should a server echo it, masked."""
        text = f"{type(exc).__name__}: {exc}"
        password = self._environ.get(self._cfg.password_env)
        return text.replace(password, "***") if password else text


# ---------------------------------------------------------------------- helpers


def _open_mailbox(cfg: ImapSettings) -> BaseMailBox:
    """A connected, not yet logged-in mailbox; TLS verifies the certificate and the host name."""
    if cfg.security == "none":
        return MailBoxUnencrypted(cfg.host, cfg.port, timeout=IO_TIMEOUT_S)
    context = ssl.create_default_context()  # imaplib's own default does not verify certificates
    if cfg.security == "starttls":
        return MailBoxStartTls(cfg.host, cfg.port, timeout=IO_TIMEOUT_S, ssl_context=context)
    return MailBox(cfg.host, cfg.port, timeout=IO_TIMEOUT_S, ssl_context=context)


def _select(mailbox: BaseMailBox, folder: str) -> tuple[int, int | None]:
    """SELECT `folder`; returns its UIDVALIDITY and message count."""
    mailbox.folder.set(folder)
    responses = mailbox.client.untagged_responses
    uidvalidity = responses.get("UIDVALIDITY", [None])[-1]
    if uidvalidity is None:  # not announced with SELECT: ask for it
        return int(mailbox.folder.status(folder, ["UIDVALIDITY"])["UIDVALIDITY"]), None
    exists = responses.get("EXISTS", [None])[-1]
    return int(uidvalidity), int(exists) if exists is not None else None


def _refresh_capabilities(mailbox: BaseMailBox) -> None:
    """Servers announce more (MOVE, IDLE) after login than in their greeting."""
    typ, data = mailbox.client.capability()
    if typ == "OK" and data and isinstance(data[-1], bytes):
        mailbox.client.capabilities = tuple(data[-1].decode("ascii", "replace").upper().split())


def _fetch(mailbox: BaseMailBox, uid_set: str, item: str) -> dict[int, bytes]:
    """UID FETCH one body item for `uid_set`; returns the literal per UID."""
    typ, data = mailbox.client.uid("FETCH", uid_set, f"(UID {item})")
    if typ != "OK":
        raise imaplib.IMAP4.error(f"UID FETCH bodies failed: {typ}")
    raws: dict[int, bytes] = {}
    orphan: bytes | None = None  # a literal whose UID comes after it in the response
    for part in data:
        if isinstance(part, tuple):
            uid = _UID.search(part[0])
            if uid is not None:
                raws[int(uid[1])] = part[1]
                orphan = None
            else:
                orphan = part[1]
        elif isinstance(part, bytes) and orphan is not None:
            uid = _UID.search(part)
            if uid is not None:
                raws[int(uid[1])] = orphan
            orphan = None
    return raws


def _batches(waiting: list[MessageInfo], cap: int) -> Iterator[list[MessageInfo]]:
    """Groups of at most FETCH_BATCH messages and FETCH_BATCH_BYTES bytes, in UID order."""
    batch: list[MessageInfo] = []
    size = 0
    for info in waiting:
        fetched = min(info.size, cap + 1)
        if batch and (len(batch) >= FETCH_BATCH or size + fetched > FETCH_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(info)
        size += fetched
    if batch:
        yield batch


def _quiet_logout(mailbox: BaseMailBox) -> None:
    """Log out, or just close the socket when the server is already gone."""
    try:
        mailbox.client.sock.settimeout(2.0)
        mailbox.logout()
    except Exception:
        try:
            mailbox.client.shutdown()
        except Exception:
            pass
