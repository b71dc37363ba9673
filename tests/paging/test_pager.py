"""The paging outbox against the Slack stand-in, through slack_sdk's WebClient."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select

from crewguard.clock import FakeClock
from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import pages
from crewguard.crew.paging import (
    ConsoleTransport,
    Pager,
    SlackTransport,
    build_transport,
    enqueue_page,
    notify_manager,
    pending_pages,
)
from crewguard.retry import RetryPolicy
from crewguard.settings import Settings
from crewguard.standins.slack import DEFAULT_TOKEN, SlackStandin


@pytest.fixture
def slack() -> Iterator[SlackStandin]:
    with SlackStandin() as standin:
        yield standin


@pytest.fixture
def settings(slack: SlackStandin, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("SLACK_BOT_TOKEN", DEFAULT_TOKEN)
    return Settings(
        notify={"slack": {"base_url": slack.base_url, "channel": "#support-oncall", "timeout_s": 2}}
    )


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = db.open_engine(sqlite_url)
    yield engine
    engine.dispose()


def _page(engine: Engine, text: str, incident_id: int | None = None, kind: str = "post", clock=None) -> int:
    with db.write(engine) as conn:
        return enqueue_page(conn, text=text, incident_id=incident_id, kind=kind, clock=clock or FakeClock())


def _rows(engine: Engine) -> list:
    with db.read(engine) as conn:
        return conn.execute(select(pages).order_by(pages.c.id)).all()


def test_incident_is_one_message_updated_in_place_with_a_thread(
    engine: Engine, settings: Settings, slack: SlackStandin
) -> None:
    clock = FakeClock()
    _page(engine, "loop in run r1 (1 time)", incident_id=7)
    _page(engine, "loop in run r1 (2 times)", incident_id=7, kind="update")
    _page(engine, "killed run r1; email sent to review", incident_id=7, kind="reply")
    _page(engine, "loop in run r1 (3 times), killed", incident_id=7, kind="update")
    pager = Pager(engine, settings, clock=clock)
    assert isinstance(pager.transport, SlackTransport)
    assert pager.deliver_pending() == 4

    [top] = slack.top_level()
    assert top.text == "loop in run r1 (3 times), killed"
    assert top.history == ["loop in run r1 (1 time)", "loop in run r1 (2 times)"]
    assert [m.text for m in slack.thread(top.ts)] == ["killed run r1; email sent to review"]
    assert [c[0] for c in slack.calls] == [
        "chat.postMessage",
        "chat.update",
        "chat.postMessage",
        "chat.update",
    ]
    rows = _rows(engine)
    assert {r.state for r in rows} == {"sent"}
    assert rows[0].ts == top.ts and rows[0].channel == top.channel
    # A later round has nothing to send and sends nothing twice.
    assert pager.deliver_pending() == 0
    assert len(slack.calls) == 4


def test_pages_of_different_incidents_are_separate_messages(
    engine: Engine, settings: Settings, slack: SlackStandin
) -> None:
    _page(engine, "stall A", incident_id=1)
    _page(engine, "stall B", incident_id=2)
    _page(engine, "stall A again", incident_id=1, kind="update")
    _page(engine, "queue is deep")  # no incident: a plain post
    assert Pager(engine, settings, clock=FakeClock()).deliver_pending() == 4
    assert sorted(m.text for m in slack.top_level()) == ["queue is deep", "stall A again", "stall B"]


def test_rate_limited_then_delivered(engine: Engine, settings: Settings, slack: SlackStandin) -> None:
    slack.fail_next(1, status=429, retry_after=0)
    _page(engine, "token spike in run r2")
    assert Pager(engine, settings, clock=FakeClock()).deliver_pending() == 1
    assert [m.text for m in slack.top_level()] == ["token spike in run r2"]
    assert [c[0] for c in slack.calls] == ["chat.postMessage", "chat.postMessage"]


def test_persistent_rate_limit_backs_off_at_least_retry_after(
    engine: Engine, settings: Settings, slack: SlackStandin
) -> None:
    slack.fail_next(3, status=429, retry_after=0)  # the SDK's own retries are used up
    clock = FakeClock()
    _page(engine, "page", clock=clock)
    pager = Pager(engine, settings, clock=clock, policy=RetryPolicy(base_s=5, cap_s=5))
    assert pager.deliver_pending() == 0
    [row] = _rows(engine)
    assert row.state == "pending" and row.attempts == 1 and "429" in row.last_error
    assert row.available_at > clock.now()
    assert pager.deliver_pending() == 0  # not due yet: Slack is not called
    assert len(slack.calls) == 3
    clock.advance(5)
    assert pager.deliver_pending() == 1
    assert len(slack.top_level()) == 1


def test_slack_outage_delays_pages_but_loses_and_duplicates_none(
    engine: Engine, settings: Settings, slack: SlackStandin
) -> None:
    clock = FakeClock()
    pager = Pager(engine, settings, clock=clock, policy=RetryPolicy(base_s=10, cap_s=10))
    slack.down()
    _page(engine, "incident 1 opened", incident_id=1, clock=clock)
    _page(engine, "incident 1: 2 times", incident_id=1, kind="update", clock=clock)
    _page(engine, "plain page", clock=clock)
    assert pager.deliver_pending() == 0  # connection refused: never raises
    first = _rows(engine)
    assert [r.state for r in first] == ["pending"] * 3
    assert first[0].attempts == 1 and "URLError" in first[0].last_error
    assert DEFAULT_TOKEN not in first[0].last_error
    clock.advance(10)
    assert pager.deliver_pending() == 0  # still down
    assert _rows(engine)[0].attempts == 2

    slack.up()
    clock.advance(10)
    assert pager.deliver_pending() == 3
    texts = sorted(m.text for m in slack.top_level())
    assert texts == ["incident 1: 2 times", "plain page"]
    assert len(slack.messages) == 2
    assert pending_pages(engine) == []
    assert pager.deliver_pending() == 0


def test_server_errors_keep_the_page_pending(engine: Engine, settings: Settings, slack: SlackStandin) -> None:
    clock = FakeClock()
    slack.fail_next(3, status=503)  # first call + the SDK's 2 retries
    _page(engine, "error burst", clock=clock)
    pager = Pager(engine, settings, clock=clock, policy=RetryPolicy(base_s=1, cap_s=1))
    assert pager.deliver_pending() == 0
    assert _rows(engine)[0].state == "pending"
    clock.advance(1)
    assert pager.deliver_pending() == 1
    assert [m.text for m in slack.top_level()] == ["error burst"]


def test_update_waits_for_the_incident_post(engine: Engine, settings: Settings, slack: SlackStandin) -> None:
    clock = FakeClock()
    _page(engine, "first", incident_id=3, clock=clock)
    _page(engine, "second", incident_id=3, kind="update", clock=clock)
    _page(engine, "unrelated", clock=clock)
    # The incident's post is being delivered by another pager (claimed): its update must wait.
    with db.write(engine) as conn:
        conn.execute(pages.update().where(pages.c.id == 1).values(available_at=clock.now() + 60))
    pager = Pager(engine, settings, clock=clock)
    assert pager.deliver_pending() == 1
    assert [m.text for m in slack.top_level()] == ["unrelated"]
    clock.advance(60)
    assert pager.deliver_pending() == 2
    [incident] = [m for m in slack.top_level() if m.text != "unrelated"]
    assert incident.text == "second" and incident.history == ["first"]


def test_refused_page_is_marked_failed_and_does_not_block_the_rest(
    engine: Engine, settings: Settings, slack: SlackStandin
) -> None:
    slack.fail_next(1, status=200, error="invalid_blocks")
    _page(engine, "bad page", incident_id=9)
    _page(engine, "follow-up", incident_id=9, kind="reply")
    _page(engine, "other")
    assert Pager(engine, settings, clock=FakeClock()).deliver_pending() == 2
    rows = _rows(engine)
    assert rows[0].state == "failed" and "invalid_blocks" in rows[0].last_error
    # With no message for the incident, the reply becomes its message.
    assert rows[1].state == "sent" and rows[1].kind == "post"
    assert sorted(m.text for m in slack.top_level()) == ["follow-up", "other"]


def test_invalid_token_keeps_pages_pending_and_never_shows_the_token(
    engine: Engine, slack: SlackStandin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "xoxb-wrong-SECRET-token"
    monkeypatch.setenv("SLACK_BOT_TOKEN", secret)
    settings = Settings(notify={"slack": {"base_url": slack.base_url}})
    _page(engine, "hello")
    caplog.set_level("DEBUG")
    assert Pager(engine, settings, clock=FakeClock()).deliver_pending() == 0
    [row] = _rows(engine)
    assert row.state == "pending" and "invalid_auth" in row.last_error
    assert secret not in row.last_error
    assert secret not in caplog.text


def test_console_transport_without_token(
    engine: Engine, slack: SlackStandin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    settings = Settings(notify={"slack": {"base_url": slack.base_url, "channel": "#oncall"}})
    assert isinstance(build_transport(settings), ConsoleTransport)
    _page(engine, "stall in run r3\nsecond line", incident_id=4)
    _page(engine, "stall in run r3 (2 times)", incident_id=4, kind="update")
    pager = Pager(engine, settings, clock=FakeClock())
    assert pager.deliver_pending() == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "[page console.1] #oncall: stall in run r3 | second line",
        "[page console.1 updated] #oncall: stall in run r3 (2 times)",
    ]
    assert {r.state for r in _rows(engine)} == {"sent"}
    assert slack.calls == []


def test_notify_manager_mentions_the_manager(engine: Engine, slack: SlackStandin) -> None:
    out = io.StringIO()
    settings = Settings(notify={"slack": {"manager": "U0MANAGER1"}})
    clock = FakeClock()
    with db.write(engine) as conn:
        notify_manager(
            conn, text="Salesforce is failing: email abc sent to review", settings=settings, clock=clock
        )
    assert Pager(engine, settings, client=ConsoleTransport(out), clock=clock).deliver_pending() == 1
    assert "<@U0MANAGER1> Salesforce is failing: email abc sent to review" in out.getvalue()
    plain = Settings()
    with db.write(engine) as conn:
        page_id = notify_manager(conn, text="x", settings=plain)
    assert next(r for r in _rows(engine) if r.id == page_id).text == "@support-manager x"


def test_enqueue_rejects_bad_pages(engine: Engine) -> None:
    with db.write(engine) as conn:
        with pytest.raises(ValueError, match="kind"):
            enqueue_page(conn, text="x", kind="shout")
        with pytest.raises(ValueError, match="incident_id"):
            enqueue_page(conn, text="x", kind="update")
        with pytest.raises(ValueError, match="non-empty"):
            enqueue_page(conn, text="  ")


def test_page_enqueued_in_a_rolled_back_transaction_is_not_sent(engine: Engine) -> None:
    with pytest.raises(RuntimeError), db.write(engine) as conn:
        enqueue_page(conn, text="never")
        raise RuntimeError("the caller's transaction fails")
    assert _rows(engine) == []


def test_outbox_on_both_engines(ledger_url: str, settings: Settings, slack: SlackStandin) -> None:
    """Two pagers delivering the same outbox at once: every page exactly once, incidents in order."""
    engine = db.open_engine(ledger_url)
    try:
        clock = FakeClock()
        for n in range(4):
            _page(engine, f"incident {n} v0", incident_id=n)
            _page(engine, f"incident {n} v1", incident_id=n, kind="update")
            _page(engine, f"incident {n} note", incident_id=n, kind="reply")
            _page(engine, f"plain {n}")
        pagers = [Pager(engine, settings, clock=clock) for _ in range(2)]
        for _ in range(20):  # several rounds: an update may wait for its post in a round
            threads = [threading.Thread(target=p.deliver_pending, kwargs={"limit": 5}) for p in pagers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if not pending_pages(engine):
                break
        assert pending_pages(engine) == []
        assert len(slack.messages) == 12  # 4 incident messages, 4 replies, 4 plain posts
        top = {m.text: m for m in slack.top_level()}
        assert sorted(top) == sorted(
            [f"incident {n} v1" for n in range(4)] + [f"plain {n}" for n in range(4)]
        )
        for n in range(4):
            msg = top[f"incident {n} v1"]
            assert msg.history == [f"incident {n} v0"]
            assert [r.text for r in slack.thread(msg.ts)] == [f"incident {n} note"]
    finally:
        engine.dispose()
