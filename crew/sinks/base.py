"""The ticket sink interface: where a classified email becomes a ticket, idempotently.

A sink creates at most one ticket per email key, however often it is called (retries,
re-claimed jobs): the helpdesk because its ticket row is unique on the idempotency key,
Salesforce because cases are upserted on an External ID holding the email key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from crewguard.retry import Attempt, RetryableError, RetryPolicy, call_with_retries

if TYPE_CHECKING:
    from crewguard.clock import Clock
    from crewguard.settings import Settings


@dataclass(frozen=True)
class TicketRequest:
    idempotency_key: str  # "<email key>:ticket"
    email_key: str  # sha256 hex of the email; the sink's dedupe key
    team: str  # a configured team
    category: str  # a configured category
    classifier: str  # llm | keyword | human
    subject: str
    sender: str
    summary: str  # the ticket body (the crew's summary of the email)
    run_id: str | None  # the run that produced it, for tracing back


class SinkError(Exception):
    """Ticket creation failed; `retryable` says whether another attempt may succeed.

    The message names the sink and the cause, never a credential.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class RetryableSinkError(SinkError, RetryableError):
    """A SinkError worth another attempt (5xx, timeouts, lock contention, connection errors)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        SinkError.__init__(self, message, retryable=True, retry_after=retry_after)


class Sink(Protocol):
    name: str  # helpdesk | salesforce: stored in tickets.sink

    def create_ticket(self, req: TicketRequest) -> str:
        """Create (or find) the ticket for `req.email_key`; returns its external id."""
        ...


def sink_policy(settings: Settings) -> RetryPolicy:
    """The retry policy for ticket creation (settings.sinks: attempts, backoff)."""
    s = settings.sinks
    return RetryPolicy(max_attempts=s.attempts, base_s=s.backoff_base_s, cap_s=s.backoff_cap_s)


def create_ticket_with_retries(
    sink: Sink,
    req: TicketRequest,
    policy: RetryPolicy,
    on_retry: Callable[[Attempt], None] | None = None,
    *,
    clock: Clock | None = None,
) -> str:
    """Create the ticket, retrying retryable SinkErrors with backoff; raises the last SinkError."""
    kwargs = {"clock": clock} if clock is not None else {}
    return call_with_retries(
        lambda _attempt: sink.create_ticket(req),
        policy,
        retry_on=(RetryableSinkError,),
        on_retry=on_retry,
        **kwargs,
    )


def build_sink(settings: Settings) -> Sink:
    """The configured primary sink (settings.sinks.primary)."""
    if settings.sinks.primary == "salesforce":
        from crewguard.crew.sinks.salesforce import SalesforceSink

        return SalesforceSink.from_settings(settings)
    from crewguard.crew.sinks.helpdesk import HelpdeskSink

    return HelpdeskSink()
