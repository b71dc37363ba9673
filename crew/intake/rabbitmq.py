"""Receive email from a RabbitMQ queue into the ledger; ack only after the ledger commit.

The message body is the raw RFC 822 bytes. The queue is a quorum queue whose rejected messages
go (at-least-once) through a dead-letter exchange to `<queue>.dead`. Each delivery is
acknowledged only once receive_email() has committed, so a crash before the ack redelivers and
the email key absorbs the duplicate. A message the ledger refuses is dead-lettered; a ledger
outage requeues and pauses consuming with backoff. poll() never blocks for long: the daemon
calls it every loop turn and it drains what arrives within POLL_BUDGET_S.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from crewguard.clock import SYSTEM_CLOCK, Clock
from crewguard.crew.intake import cursors
from crewguard.crew.intake.receive import ReceiveResult, receive_email
from crewguard.retry import RetryPolicy
from crewguard.settings import RabbitSettings, Settings

log = logging.getLogger(__name__)

#: `source` value of emails taken from RabbitMQ.
SOURCE_RABBITMQ = "rabbitmq"
#: Suffix of the queue that collects the messages the ledger refused.
DEAD_SUFFIX = ".dead"
#: poll() stops draining after about this long, so the daemon loop keeps turning.
POLL_BUDGET_S = 0.5
#: poll() stops draining when nothing arrived within this slice (the queue is empty).
POLL_SLICE_S = 0.05
#: Socket and connect timeout towards the broker.
SOCKET_TIMEOUT_S = 5.0
#: First reconnect (or ledger-outage) backoff is drawn from [0, this]; it doubles up to the cap.
RECONNECT_BASE_S = 1.0
#: The state row (and the queue depth in it) is refreshed at most this often while running.
STATE_EVERY_S = 5.0
#: Content type of published emails.
CONTENT_TYPE = "message/rfc822"
#: Connection name shown by `rabbitmqctl list_connections client_properties`.
DEFAULT_CONNECTION_NAME = "crewguard-intake"

#: receive_email's signature: stores one message, raises only when the ledger fails.
Receive = Callable[..., ReceiveResult]
_BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


def queue_arguments(queue: str, dead_letter_exchange: str) -> dict[str, Any]:
    """Arguments of the intake queue: quorum, at-least-once dead-lettering to `<queue>.dead`."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead_letter_exchange,
        "x-dead-letter-routing-key": queue,  # whatever route a message came by, it dies to <queue>.dead
        "x-dead-letter-strategy": "at-least-once",  # the default, at-most-once, may drop dead letters
        "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
    }


def declare_topology(channel: BlockingChannel, queue: str, dead_letter_exchange: str) -> None:
    """Declare (idempotently) the queue, its dead-letter exchange and `<queue>.dead` bound to it."""
    dead = queue + DEAD_SUFFIX
    channel.exchange_declare(dead_letter_exchange, exchange_type="direct", durable=True)
    channel.queue_declare(dead, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(dead, dead_letter_exchange, routing_key=queue)
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue, dead_letter_exchange))


def publish_emails(
    url: str, queue: str, raws: Iterable[bytes], *, dead_letter_exchange: str | None = None
) -> int:
    """Publish raw emails to `queue` with publisher confirms; returns how many the broker confirmed.

    `dead_letter_exchange`: when given, the queue topology is declared first. Raises when the
    broker refuses or cannot route a message (nothing is silently dropped).
    """
    connection = pika.BlockingConnection(_parameters(url, "crewguard-publisher"))
    try:
        channel = connection.channel()
        if dead_letter_exchange is not None:
            declare_topology(channel, queue, dead_letter_exchange)
        channel.confirm_delivery()
        count = 0
        for raw in raws:
            channel.basic_publish(
                exchange="",
                routing_key=queue,
                body=raw,
                properties=BasicProperties(
                    content_type=CONTENT_TYPE, delivery_mode=2, timestamp=int(time.time())
                ),
                mandatory=True,  # an unroutable message raises instead of vanishing
            )
            count += 1
        return count
    finally:
        if connection.is_open:
            connection.close()


def publish_email(url: str, queue: str, raw: bytes, *, dead_letter_exchange: str | None = None) -> None:
    """Publish one raw email (see publish_emails)."""
    publish_emails(url, queue, [raw], dead_letter_exchange=dead_letter_exchange)


class RabbitIntake:
    """Consumes settings.intake.rabbitmq.queue into the ledger, a bounded drain per poll()."""

    name = SOURCE_RABBITMQ  # the daemon's Intake protocol (crew/workers/daemon.py)

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        after_commit: Callable[[ReceiveResult], None] | None = None,
        receive: Receive = receive_email,
        connection_name: str = DEFAULT_CONNECTION_NAME,
    ) -> None:
        """`engine`: the ledger; `settings`: intake.rabbitmq plus the size cap and max attempts;
        `clock`: timestamps; `after_commit`: called after each ledger commit, before the ack (a
        seam for crash tests); `receive`: stores one message (receive_email's signature);
        `connection_name`: how the broker lists this connection."""
        self._engine = engine
        self._settings = settings
        self._cfg: RabbitSettings = settings.intake.rabbitmq
        self._clock = clock
        self._after_commit = after_commit
        self._receive = receive
        self._connection_name = connection_name
        self._params = _parameters(self._cfg.url, connection_name)
        self._retry = RetryPolicy(max_attempts=1, base_s=RECONNECT_BASE_S, cap_s=self._cfg.reconnect_cap_s)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._resume_at = 0.0  # monotonic time before which poll() only keeps the connection alive
        self._broker_failures = 0
        self._ledger_failures = 0
        self._outage: BaseException | None = None  # set by a delivery that met a ledger outage
        self._deliveries = 0
        self._new = 0
        self._received_total = 0
        self._dead_lettered = 0
        self._last_state_at = float("-inf")
        self._state: dict[str, Any] = {}

    @property
    def source(self) -> str:
        """The intake_cursors key of this queue (no credentials in it)."""
        p = self._params
        vhost = urllib.parse.quote(p.virtual_host, safe="")
        return f"{SOURCE_RABBITMQ}:{p.host}:{p.port}/{vhost}/{self._cfg.queue}"

    # ------------------------------------------------------------------ daemon protocol

    def poll(self) -> int:
        """Drain what arrives within POLL_BUDGET_S; returns how many new emails were queued."""
        if time.monotonic() < self._resume_at:
            self._keep_alive()
            return 0
        try:
            if self._connection is None:
                self._connect()
            if self._consumer_tag is None:
                self._start_consuming()
            self._drain()
        except Exception as exc:  # broker gone, or a crash mid-delivery: unacked messages requeue
            self._broker_down(exc)
        if self._outage is not None:
            self._ledger_down()
        self._report_periodically()
        count, self._new = self._new, 0
        return count

    def close(self) -> None:
        """Stop consuming and disconnect; unacknowledged deliveries go back to the queue."""
        self._disconnect()

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        connection = pika.BlockingConnection(self._params)
        try:
            channel = connection.channel()
            declare_topology(channel, self._cfg.queue, self._cfg.dead_letter_exchange)
            channel.basic_qos(prefetch_count=self._cfg.prefetch)
        except BaseException:
            _quiet_close(connection)
            raise
        self._connection, self._channel = connection, channel
        self._broker_failures = 0
        log.info("RabbitMQ intake connected to %s", self.source)
        self._report(connected=True, last_error=None, retry_in_s=None)

    def _start_consuming(self) -> None:
        assert self._channel is not None
        self._consumer_tag = self._channel.basic_consume(self._cfg.queue, self._on_message, auto_ack=False)

    def _disconnect(self) -> None:
        connection, self._connection, self._channel, self._consumer_tag = (self._connection, None, None, None)
        if connection is not None:
            _quiet_close(connection)

    def _keep_alive(self) -> None:
        """Answer heartbeats while paused; a dead connection is dropped (reconnect later)."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except _BROKER_ERRORS:
            self._disconnect()

    def _broker_down(self, exc: BaseException) -> None:
        self._disconnect()
        self._broker_failures += 1
        delay = self._retry.backoff(self._broker_failures)
        self._resume_at = time.monotonic() + delay
        error = _describe(exc)
        log.warning("RabbitMQ intake %s: %s; reconnecting in %.1f s", self.source, error, delay)
        self._report(connected=False, last_error=error, retry_in_s=round(delay, 3))

    def _ledger_down(self) -> None:
        """Stop deliveries (the broker requeues the prefetched ones) and wait before trying again."""
        exc, self._outage = self._outage, None
        assert exc is not None
        if self._channel is not None and self._consumer_tag is not None:
            try:
                self._channel.basic_cancel(self._consumer_tag)  # nacks (requeues) undelivered prefetch
            except _BROKER_ERRORS:
                self._disconnect()
        self._consumer_tag = None
        self._ledger_failures += 1
        delay = self._retry.backoff(self._ledger_failures)
        self._resume_at = time.monotonic() + delay
        error = _describe(exc)
        log.warning("RabbitMQ intake %s: ledger unavailable (%s); pausing %.1f s", self.source, error, delay)
        self._report(last_error=f"ledger unavailable: {error}", retry_in_s=round(delay, 3))

    # ------------------------------------------------------------------ consuming

    def _drain(self) -> None:
        assert self._connection is not None
        deadline = time.monotonic() + POLL_BUDGET_S
        while self._outage is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            before = self._deliveries
            self._connection.process_data_events(time_limit=min(POLL_SLICE_S, remaining))
            if self._deliveries == before:
                break  # nothing arrived within a slice: the queue is drained for now

    def _on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes
    ) -> None:
        """Ledger first, then the ack; see the module docstring for the failure cases."""
        self._deliveries += 1
        tag = method.delivery_tag
        if self._outage is not None:  # prefetched after an outage began: back to the queue
            channel.basic_nack(tag, requeue=True)
            return
        try:
            result = self._receive(
                self._engine,
                body,
                source=SOURCE_RABBITMQ,
                source_ref=self._ref(properties, tag),
                settings=self._settings,
                clock=self._clock,
            )
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError) and cursors.is_ledger_outage(exc):
                channel.basic_nack(tag, requeue=True)
                self._outage = exc
                return
            # The ledger refuses this very message: it would fail forever, so it dead-letters.
            log.error(
                "RabbitMQ %s: message refused by the ledger, dead-lettered: %s", self.source, _describe(exc)
            )
            channel.basic_nack(tag, requeue=False)
            self._dead_lettered += 1
            self._report(dead_lettered=self._dead_lettered, last_error=f"dead-lettered: {_describe(exc)}")
            return
        if self._after_commit is not None:
            self._after_commit(result)
        channel.basic_ack(tag)
        self._ledger_failures = 0
        if not result.duplicate:
            self._new += 1
            self._received_total += 1
        now = self._clock.now()
        self._state["last_message_at"] = now
        if properties.timestamp:
            self._state["lag_s"] = round(max(0.0, now - properties.timestamp), 3)

    # ------------------------------------------------------------------ reporting

    def _ref(self, properties: BasicProperties, tag: int) -> str:
        where = (
            f"amqp://{self._params.host}:{self._params.port}/{urllib.parse.quote(self._cfg.queue, safe='')}"
        )
        return (
            f"{where};message-id={properties.message_id}"
            if properties.message_id
            else f"{where};delivery-tag={tag}"
        )

    def _report_periodically(self) -> None:
        if time.monotonic() - self._last_state_at < STATE_EVERY_S:
            return
        fields: dict[str, Any] = {
            **self._state,
            "connected": self._connection is not None,
            "received": self._received_total,
            "dead_lettered": self._dead_lettered,
        }
        if self._channel is not None:
            try:
                declared = self._channel.queue_declare(self._cfg.queue, passive=True)
                fields["pending"] = declared.method.message_count
            except _BROKER_ERRORS as exc:
                self._broker_down(exc)
                return
        self._report(**fields)

    def _report(self, **fields: Any) -> None:
        """Merge `fields` into this intake's state row; a ledger outage only costs the report."""
        self._last_state_at = time.monotonic()
        try:
            cursors.update_state(self._engine, self.source, self._clock, **fields)
        except SQLAlchemyError as exc:
            log.debug("RabbitMQ %s: state not recorded: %s", self.source, type(exc).__name__)


def _parameters(url: str, connection_name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.socket_timeout = SOCKET_TIMEOUT_S
    params.stack_timeout = SOCKET_TIMEOUT_S * 2
    params.connection_attempts = 1
    params.client_properties = {"connection_name": connection_name}
    return params


def _describe(exc: BaseException) -> str:
    """`Type: message`; pika errors carry no credentials (the URL is never part of them)."""
    text = str(exc) or repr(exc.args)
    return f"{type(exc).__name__}: {text}"


def _quiet_close(connection: pika.BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:
        pass
