"""The local feed without CrewAI (both ledger engines), accounting, and the masking rules."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from crewguard.crew.ledger import db
from crewguard.crew.ledger.schema import runs, trace_events
from crewguard.crew.tracing import start_tracing
from crewguard.crew.tracing.accounting import PriceTable, RunUsage, UsageBook
from crewguard.crew.tracing.local_feed import FeedWriter
from crewguard.crew.tracing.masking import attribute_patch, mask_contacts
from crewguard.crew.tracing.spans import normalize_json_text, prompt_sha
from crewguard.settings import Price
from tests.tracing.conftest import make_run, tracing_settings


def test_flow_steps_and_events_reach_the_feed_on_both_engines(ledger_url) -> None:
    ledger = make_run(ledger_url)
    handle = start_tracing(tracing_settings(langfuse=False), ledger.engine)
    run_id = ledger.claim.run_id
    with pytest.raises(RuntimeError), handle.run_scope(run_id=run_id, email_key=ledger.claim.email_key):
        with handle.step("ticket.create", attempt=1) as step:
            step.set(sink="helpdesk")
        handle.event("retry", attempt=2, delay_s=0.5, error="call bob@example.com")
        with handle.step("ticket.create", attempt=2):
            raise RuntimeError("sink down")
    assert handle.shutdown(timeout_s=5.0)
    with db.read(ledger.engine) as conn:
        rows = conn.execute(
            sa.select(trace_events).where(trace_events.c.run_id == run_id).order_by(trace_events.c.id)
        ).all()
        run = conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()
    ends = [(r.name, json.loads(r.attributes)) for r in rows if r.phase == "end"]
    assert ends == [
        ("ticket.create", {"step": "ticket.create", "attempt": 1, "sink": "helpdesk"}),
        ("retry", {"step": "retry", "attempt": 2, "delay_s": 0.5, "error": "call [email]"}),
        ("ticket.create", {"step": "ticket.create", "attempt": 2, "error": "RuntimeError: sink down"}),
        (
            "crewguard.email",
            {"step": "run", "email_key": ledger.claim.email_key, "error": "RuntimeError: sink down"},
        ),
    ]
    assert {r.kind for r in rows} == {"FLOW"} and len(rows) == 8
    assert run.llm_calls == 0 and run.last_progress_at is not None
    ledger.engine.dispose()


def test_a_full_queue_drops_and_counts_instead_of_blocking(sqlite_url) -> None:
    ledger = make_run(sqlite_url)
    raw = ledger.engine.raw_connection()
    raw.driver_connection.isolation_level = None
    raw.driver_connection.execute("BEGIN IMMEDIATE")  # the ledger is locked: nothing drains
    writer = FeedWriter(ledger.engine, UsageBook(), queue_max=3)
    row = {
        "run_id": ledger.claim.run_id,
        "span_id": "0" * 16,
        "phase": "start",
        "kind": "FLOW",
        "name": "x",
        "at": 1.0,
    }
    for _ in range(20):
        writer.submit(dict(row))
    assert writer.dropped >= 20 - 3 - 1  # one may already be in the writer's hands
    raw.driver_connection.execute("ROLLBACK")
    raw.close()
    assert writer.close(5.0)
    assert writer.written + writer.dropped == 20
    ledger.engine.dispose()


def test_tracing_without_a_ledger_or_after_a_failed_setup_is_a_no_op() -> None:
    handle = start_tracing(tracing_settings(langfuse=False), None)
    with handle.run_scope(run_id="r-1"), handle.step("classify.keyword"):
        handle.event("fallback", classifier="keyword")
    assert handle.usage("r-1") == RunUsage(progress_at=handle.usage("r-1").progress_at)
    assert handle.shutdown(1.0)


def test_prices_match_with_and_without_provider_prefix() -> None:
    prices = PriceTable({"openai/gpt-4o-mini": Price(prompt_per_1k=0.15, completion_per_1k=0.6)})
    assert prices.cost("gpt-4o-mini", 1000, 1000) == prices.cost("openai/gpt-4o-mini", 1000, 1000) == 0.75
    assert prices.cost("azure/gpt-4o-mini", 2000, 0) == 0.3
    assert prices.cost("llama3", 1000, 1000) == 0.0


def test_usage_book_gives_back_a_failed_write() -> None:
    book = UsageBook()
    book.add("r", RunUsage(llm_calls=1, prompt_tokens=10, progress_at=5.0))
    part = book.take_pending()
    book.add("r", RunUsage(tool_calls=1, progress_at=6.0))
    book.give_back(part)
    assert book.take_pending() == {
        "r": RunUsage(llm_calls=1, tool_calls=1, prompt_tokens=10, progress_at=6.0)
    }
    assert book.totals("r") == RunUsage(llm_calls=1, tool_calls=1, prompt_tokens=10, progress_at=6.0)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("mail alice.b+x@mail.example.co.uk now", "mail [email] now"),
        ("call +1 415 555 1234.", "call [phone]."),
        ("or (555) 123-4567 / +44 20 7946 0958", "or [phone] / [phone]"),
        ("on 2026-01-01T10:00:00Z, v1.15.30, id 123456789012, 100 200 300", None),
        ("uuid 9d7e430e-3176-4666-803f-b8437f74b22f at 1700000000.123", None),
    ],
)
def test_contact_masking(text: str, masked: str | None) -> None:
    assert mask_contacts(text) == (masked or text)


def test_attribute_patch_per_mode() -> None:
    attrs = {"input.value": '{"q": "bob@example.com"}', "tool.name": "lookup", "llm.token_count.prompt": 12}
    assert attribute_patch(attrs, "off") == ({}, [])
    assert attribute_patch(attrs, "contacts") == ({"input.value": '{"q": "[email]"}'}, [])
    patched, _ = attribute_patch(attrs, "bodies")
    assert list(patched) == ["input.value"] and patched["input.value"].startswith("<removed sha256=")
    assert attribute_patch({"input.value": "same"}, "bodies") == attribute_patch(
        {"input.value": "same"}, "bodies"
    )


def test_normalization_makes_equal_calls_equal() -> None:
    assert (
        normalize_json_text('{"b": 1,  "a": "x   y"}')
        == normalize_json_text('{"a":"x y","b":1}')
        == '{"a":"x y","b":1}'
    )
    assert normalize_json_text("not  json\n") == "not json"
    assert prompt_sha('[{"role": "user", "content": "hi  there"}]') == prompt_sha(
        '[{"content":"hi there","role":"user"}]'
    )
