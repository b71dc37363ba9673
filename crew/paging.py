"""Paging through a durable outbox: pages are rows in the ledger, delivered to Slack later.

Whoever pages (the supervisor, the flow when a sink gives up) only inserts a `pages` row in
its own transaction, so a Slack outage never blocks or loses anything: the `Pager` delivers
pending rows in order, and a failed delivery stays pending with a backoff.

One Slack message per incident: the incident's first page is posted (its channel and ts are
stored), later "update" pages edit that message in place (their text replaces the message,
so it should carry the count and latest state) and "reply" pages go in its thread. A page
waits while an earlier page of the same incident is still pending. Pages without an
incident are plain posts. Delivery is at least once: a crash between Slack accepting a
message and the ledger recording it re-sends that message once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from sqlalchemy import Engine, select, update

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import pages
from crewguard.retry import RetryPolicy

if TYPE_CHECKING:
    from sqlalchemy import Connection, Row

    from crewguard.settings import Settings

log = logging.getLogger(__name__)

PAGE_KINDS = ("post", "update", "reply")
PAGE_PENDING = "pending"
PAGE_SENT = "sent"
PAGE_FAILED = "failed"  # Slack refused the page itself (not an outage); kept for inspection

#: First retry of a page waits up to this long; the wait doubles per attempt (full jitter).
PAGE_BACKOFF_BASE_S = 2.0
#: No page waits longer than this between attempts, however long Slack has been down.
PAGE_BACKOFF_CAP_S = 300.0
#: A page being delivered is hidden from other pagers this long (a crashed pager's page comes back).
CLAIM_LEASE_S = 120.0
#: Texts are cut to this many characters (Slack advises at most 4,000 per message).
MAX_TEXT_CHARS = 3_900
#: Retries of one Slack call inside slack_sdk (connection errors, 429, 500/503) before the outbox backs off.
SLACK_SDK_RETRIES = 2
#: Slack errors that concern the page itself: another attempt would fail the same way.
PERMANENT_SLACK_ERRORS = frozenset(
    {
        "msg_too_long",
        "no_text",
        "invalid_blocks",
        "invalid_arguments",
        "too_many_attachments",
        "invalid_thread_ts",
    }
)
#: Slack errors meaning the message to edit is gone: post a new one instead.
MESSAGE_GONE_ERRORS = frozenset({"message_not_found", "cant_update_message", "edit_window_closed"})


# --- the outbox (inside the caller's transaction) --------------------------------------------------
def enqueue_page(
    conn: Connection,
    *,
    text: str,
    incident_id: int | None = None,
    kind: str = "post",
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Queue a page in the caller's transaction; returns its id.

    kind: post (a new message; for an incident that already has one, it is edited instead),
    update (replace the incident's message text), reply (a message in the incident's thread).
    """
    if kind not in PAGE_KINDS:
        raise ValueError(f"page kind must be one of {', '.join(PAGE_KINDS)}, not {kind!r}")
    if kind != "post" and incident_id is None:
        raise ValueError(f"a {kind!r} page needs an incident_id (it refers to the incident's message)")
    if not text or not text.strip():
        raise ValueError("a page needs a non-empty text")
    now = clock.now()
    result = conn.execute(
        pages.insert().values(
            incident_id=incident_id,
            kind=kind,
            text=text,
            state=PAGE_PENDING,
            attempts=0,
            available_at=now,
            created_at=now,
        )
    )
    return int(result.inserted_primary_key[0])


def manager_mention(manager: str) -> str:
    """Slack mention syntax for the configured manager: <@U…> for user ids, <!subteam^S…> for groups."""
    if re.fullmatch(r"[UW][A-Z0-9]{6,}", manager):
        return f"<@{manager}>"
    if re.fullmatch(r"S[A-Z0-9]{6,}", manager):
        return f"<!subteam^{manager}>"
    return manager  # already a mention (<@…>) or a plain handle (@support-manager)


def notify_manager(conn: Connection, *, text: str, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> int:
    """Queue a page that mentions the support manager (settings.notify.slack.manager)."""
    mention = manager_mention(settings.notify.slack.manager)
    return enqueue_page(conn, text=f"{mention} {text}", clock=clock)


# --- transports ----------------------------------------------------------------------------------------
class PageError(Exception):
    """A delivery failed. retryable: Slack (or the way to it) is unwell, try later;
    otherwise the page itself was refused. `code` is Slack's error string, if any."""

    def __init__(
        self, message: str, *, retryable: bool, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code
        self.retry_after = retry_after


class PageTransport(Protocol):
    name: str

    def post(self, channel: str, text: str, *, thread_ts: str | None = None) -> tuple[str, str]:
        """Post a message (in a thread when `thread_ts`); returns (channel id, message ts)."""
        ...

    def update(self, channel: str, ts: str, text: str) -> tuple[str, str]:
        """Replace the text of message `ts` in `channel` (a channel id); returns (channel id, ts)."""
        ...


class SlackTransport:
    """Slack Web API through slack_sdk's WebClient with a bot token (chat:write)."""

    name = "slack"

    def __init__(self, settings: Settings, *, token: str | None = None) -> None:
        """token: the bot token; default: the variable named by settings.notify.slack.token_env."""
        from slack_sdk import WebClient
        from slack_sdk.http_retry.builtin_handlers import (
            ConnectionErrorRetryHandler,
            RateLimitErrorRetryHandler,
            ServerErrorRetryHandler,
        )

        slack = settings.notify.slack
        self._token = token if token is not None else os.environ.get(slack.token_env, "")
        if not self._token:
            raise PageError(f"slack: environment variable {slack.token_env} is not set", retryable=False)
        base_url = slack.base_url if slack.base_url.endswith("/") else slack.base_url + "/"
        self.client = WebClient(
            token=self._token,
            base_url=base_url,
            timeout=max(1, round(slack.timeout_s)),  # the SDK takes whole seconds
            retry_handlers=[
                ConnectionErrorRetryHandler(SLACK_SDK_RETRIES),
                RateLimitErrorRetryHandler(SLACK_SDK_RETRIES),
                ServerErrorRetryHandler(SLACK_SDK_RETRIES),
            ],
        )

    def post(self, channel: str, text: str, *, thread_ts: str | None = None) -> tuple[str, str]:
        args: dict[str, Any] = {"channel": channel, "text": text}
        if thread_ts:
            args["thread_ts"] = thread_ts
        resp = self._call("chat.postMessage", self.client.chat_postMessage, args)
        return str(resp["channel"]), str(resp["ts"])

    def update(self, channel: str, ts: str, text: str) -> tuple[str, str]:
        resp = self._call(
            "chat.update", self.client.chat_update, {"channel": channel, "ts": ts, "text": text}
        )
        return str(resp["channel"]), str(resp["ts"])

    def _call(self, method: str, fn: Any, args: dict[str, Any]) -> Any:
        from slack_sdk.errors import SlackApiError

        try:
            return fn(**args)
        except SlackApiError as exc:
            status = exc.response.status_code
            code = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            retry_after = _retry_after(exc.response.headers)
            retryable = (
                status == 429 or status >= 500 or code not in PERMANENT_SLACK_ERRORS | MESSAGE_GONE_ERRORS
            )
            raise PageError(
                self._scrub(f"slack {method}: HTTP {status} {code or 'error'}"),
                retryable=retryable,
                code=code,
                retry_after=retry_after,
            ) from None
        except Exception as exc:  # connection refused, timeouts, TLS: Slack is unreachable
            raise PageError(
                self._scrub(f"slack {method}: {type(exc).__name__}: {exc}")[:300], retryable=True
            ) from None

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


class ConsoleTransport:
    """Pages as one line each on stderr, when no Slack token is configured (the demo, a laptop)."""

    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        """stream: where lines go (default: sys.stderr at the time of writing)."""
        self._stream = stream
        self._count = 0

    def post(self, channel: str, text: str, *, thread_ts: str | None = None) -> tuple[str, str]:
        self._count += 1
        ts = f"console.{self._count}"
        where = f"{channel} thread {thread_ts}" if thread_ts else channel
        self._write(f"[page {ts}] {where}: {text}")
        return channel, ts

    def update(self, channel: str, ts: str, text: str) -> tuple[str, str]:
        self._write(f"[page {ts} updated] {channel}: {text}")
        return channel, ts

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(" | ".join(line.splitlines()) + "\n")
        stream.flush()


def build_transport(settings: Settings) -> PageTransport:
    """Slack when its bot token is in the environment, the console otherwise."""
    if os.environ.get(settings.notify.slack.token_env):
        return SlackTransport(settings)
    return ConsoleTransport()


def _retry_after(headers: Any) -> float | None:
    for key, value in dict(headers or {}).items():
        if key.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) else value
            try:
                return float(raw)
            except (TypeError, ValueError):
                return None
    return None


# --- the pager -------------------------------------------------------------------------------------
class Pager:
    """Delivers pending pages; the supervisor and the crew daemon call `deliver_pending` periodically.

    Several pagers may run at once: a page is claimed (hidden for CLAIM_LEASE_S) before it is sent.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        client: PageTransport | None = None,
        clock: Clock = SYSTEM_CLOCK,
        policy: RetryPolicy | None = None,
    ) -> None:
        """client: the transport (default: build_transport(settings)); policy: backoff between attempts."""
        self.engine = engine
        self.channel = settings.notify.slack.channel
        self.transport: PageTransport = client if client is not None else build_transport(settings)
        self.clock = clock
        self.policy = policy or RetryPolicy(base_s=PAGE_BACKOFF_BASE_S, cap_s=PAGE_BACKOFF_CAP_S)

    def deliver_pending(self, limit: int = 50) -> int:
        """Deliver up to `limit` due pages in order; returns how many were sent. Never raises:
        on an outage the page stays pending with a backoff and the round stops."""
        try:
            with db.read(self.engine) as conn:
                due = conn.execute(
                    select(pages.c.id)
                    .where(pages.c.state == PAGE_PENDING, pages.c.available_at <= self.clock.now())
                    .order_by(pages.c.id)
                    .limit(limit)
                ).all()
        except Exception as exc:  # the ledger is unwell: try again next round
            log.warning("pager: cannot read the outbox: %s", type(exc).__name__)
            return 0
        sent = 0
        for (page_id,) in due:
            try:
                outcome = self._deliver_one(page_id)
            except Exception as exc:
                log.warning("pager: page %s: unexpected %s", page_id, type(exc).__name__)
                break
            if outcome == "sent":
                sent += 1
            elif outcome == "outage":
                break  # Slack is unwell: the rest waits for the next round, in order
        return sent

    def _deliver_one(self, page_id: int) -> str:
        """Claim, send and record one page; returns sent | failed | outage | skipped."""
        with db.write(self.engine) as conn:
            page = conn.execute(select(pages).where(pages.c.id == page_id)).first()
            if page is None or page.state != PAGE_PENDING:
                return "skipped"
            if page.incident_id is not None and self._earlier_pending(conn, page):
                return "skipped"  # the incident's earlier page goes first
            now = self.clock.now()
            claimed = conn.execute(
                update(pages)
                .where(pages.c.id == page_id, pages.c.state == PAGE_PENDING, pages.c.available_at <= now)
                .values(available_at=now + CLAIM_LEASE_S)
            ).rowcount
            if not claimed:
                return "skipped"  # another pager has it
            anchor = self._anchor(conn, page.incident_id) if page.incident_id is not None else None
        try:
            kind, channel, ts = self._send(page, anchor)
        except PageError as exc:
            self._record_failure(page, exc)
            return "outage" if exc.retryable else "failed"
        except Exception as exc:  # a transport bug must not lose the page
            self._record_failure(page, PageError(f"{type(exc).__name__}", retryable=True))
            return "outage"
        with db.write(self.engine) as conn:
            conn.execute(
                update(pages)
                .where(pages.c.id == page.id)
                .values(
                    state=PAGE_SENT,
                    kind=kind,
                    channel=channel,
                    ts=ts,
                    attempts=page.attempts + 1,
                    sent_at=self.clock.now(),
                    last_error=None,
                )
            )
        return "sent"

    def _send(self, page: Row[Any], anchor: Row[Any] | None) -> tuple[str, str, str]:
        """Send one page; returns (the kind actually done, channel id, ts of the message it landed in)."""
        text = _cut(page.text)
        if anchor is not None and page.kind in ("post", "update"):
            try:
                channel, ts = self.transport.update(anchor.channel, anchor.ts, text)
                return page.kind, channel, ts
            except PageError as exc:
                if exc.code not in MESSAGE_GONE_ERRORS:
                    raise
                log.info("pager: incident %s message is gone; posting a new one", page.incident_id)
        elif anchor is not None and page.kind == "reply":
            channel, _ts = self.transport.post(anchor.channel, text, thread_ts=anchor.ts)
            return "reply", channel, _ts
        # No message yet for this incident (or it is gone): this page becomes its message.
        channel, ts = self.transport.post(self.channel, text)
        return "post", channel, ts

    def _record_failure(self, page: Row[Any], exc: PageError) -> None:
        attempts = page.attempts + 1
        now = self.clock.now()
        state = PAGE_PENDING if exc.retryable else PAGE_FAILED
        delay = self.policy.backoff(attempts, retry_after=exc.retry_after)
        log.warning("pager: page %s attempt %s failed: %s", page.id, attempts, exc)
        with db.write(self.engine) as conn:
            conn.execute(
                update(pages)
                .where(pages.c.id == page.id)
                .values(state=state, attempts=attempts, available_at=now + delay, last_error=str(exc)[:500])
            )

    @staticmethod
    def _earlier_pending(conn: Connection, page: Row[Any]) -> bool:
        return (
            conn.execute(
                select(pages.c.id)
                .where(
                    pages.c.incident_id == page.incident_id,
                    pages.c.id < page.id,
                    pages.c.state == PAGE_PENDING,
                )
                .limit(1)
            ).first()
            is not None
        )

    @staticmethod
    def _anchor(conn: Connection, incident_id: int) -> Row[Any] | None:
        """The incident's Slack message: its latest sent top-level post."""
        return conn.execute(
            select(pages.c.channel, pages.c.ts)
            .where(pages.c.incident_id == incident_id, pages.c.state == PAGE_SENT, pages.c.kind == "post")
            .order_by(pages.c.id.desc())
            .limit(1)
        ).first()


def pending_pages(engine: Engine) -> Sequence[Row[Any]]:
    """Pages not yet delivered (for status output and tests)."""
    with db.read(engine) as conn:
        return conn.execute(select(pages).where(pages.c.state == PAGE_PENDING).order_by(pages.c.id)).all()


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"
