"""The Salesforce sink against the HTTPS stand-in, through simple-salesforce."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import requests

from crewguard.clock import FakeClock
from crewguard.crew.sinks.base import (
    SinkError,
    TicketRequest,
    build_sink,
    create_ticket_with_retries,
    sink_policy,
)
from crewguard.crew.sinks.helpdesk import HelpdeskSink
from crewguard.crew.sinks.salesforce import SalesforceSink
from crewguard.retry import RetryPolicy
from crewguard.settings import Settings
from crewguard.standins.salesforce import SalesforceStandin

FIELD = "Support_Email_Key__c"


def _request(n: int = 1) -> TicketRequest:
    key = hashlib.sha256(f"<msg-{n}@example.com>".encode()).hexdigest()
    return TicketRequest(
        idempotency_key=f"{key}:ticket",
        email_key=key,
        team="billing",
        category="invoice",
        classifier="llm",
        subject="I was charged twice",
        sender="alice@example.com",
        summary="Customer reports a duplicate charge on invoice 1234.",
        run_id="run-1",
    )


@pytest.fixture
def standin() -> Iterator[SalesforceStandin]:
    with SalesforceStandin() as sf:
        yield sf


def _settings(standin: SalesforceStandin, **sf: object) -> Settings:
    return Settings(
        sinks={
            "primary": "salesforce",
            "salesforce": {"enabled": True, "instance_url": standin.instance_url, "timeout_s": 5, **sf},
        }
    )


@pytest.fixture
def sink(standin: SalesforceStandin, monkeypatch: pytest.MonkeyPatch) -> SalesforceSink:
    monkeypatch.setenv("SALESFORCE_SESSION_ID", standin.session_id)
    http = requests.Session()
    http.verify = standin.ca_file
    return SalesforceSink.from_settings(_settings(standin), session=http)


FAST = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01)


def test_same_email_upserted_twice_gives_one_case(standin: SalesforceStandin, sink: SalesforceSink) -> None:
    req = _request()
    first = sink.create_ticket(req)
    second = sink.create_ticket(req)
    assert first == second
    assert len(standin.cases) == 1
    case = standin.cases[first]
    assert case[FIELD] == req.email_key
    assert case["Subject"] == req.subject
    assert case["Team__c"] == "billing" and case["Type"] == "invoice"
    assert req.summary in case["Description"]
    assert ("PATCH", f"/services/data/v62.0/sobjects/Case/{FIELD}/{req.email_key}") in standin.requests


def test_update_without_body_reads_the_id_by_external_id(
    standin: SalesforceStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # API versions before 46.0 answer an updating upsert with 204 and no body.
    monkeypatch.setenv("SALESFORCE_SESSION_ID", standin.session_id)
    http = requests.Session()
    http.verify = standin.ca_file
    sink = SalesforceSink.from_settings(_settings(standin, api_version="45.0"), session=http)
    req = _request()
    assert sink.create_ticket(req) == sink.create_ticket(req)
    assert len(standin.cases) == 1
    assert ("GET", f"/services/data/v45.0/sobjects/Case/{FIELD}/{req.email_key}") in standin.requests


def test_plain_create_is_not_idempotent(standin: SalesforceStandin, sink: SalesforceSink) -> None:
    # Why upsert: the same create sent twice (a retry after a lost response) makes two cases.
    url = f"{standin.instance_url}/services/data/v62.0/sobjects/Case/"
    headers = {"Authorization": f"Bearer {standin.session_id}"}
    for _ in range(2):
        resp = requests.post(url, json={"Subject": "x", FIELD: "k"}, headers=headers, verify=standin.ca_file)
        assert resp.status_code == 201
    assert len(standin.cases_with(FIELD, "k")) == 2
    # ...and an upsert on that key now matches several records: 300, not retryable.
    with pytest.raises(SinkError) as err:
        sink.create_ticket(TicketRequest("k:ticket", "k", "billing", "invoice", "llm", "s", "a@b", "x", None))
    assert not err.value.retryable and "300" in str(err.value)


def test_two_503_then_ok_gives_one_case_after_retries(
    standin: SalesforceStandin, sink: SalesforceSink
) -> None:
    standin.fail_next(2, status=503)
    retries: list[int] = []
    clock = FakeClock()
    case_id = create_ticket_with_retries(
        sink, _request(), FAST, on_retry=lambda a: retries.append(a.number), clock=clock
    )
    assert retries == [1, 2]
    assert list(standin.cases) == [case_id]
    assert len(standin.requests) == 3


def test_lock_contention_is_retried(standin: SalesforceStandin, sink: SalesforceSink) -> None:
    standin.fail_next(1, status=400, error_code="UNABLE_TO_LOCK_ROW")
    case_id = create_ticket_with_retries(sink, _request(), FAST, clock=FakeClock())
    assert list(standin.cases) == [case_id]


def test_persistent_failure_raises_after_configured_attempts(
    standin: SalesforceStandin, sink: SalesforceSink
) -> None:
    standin.fail_next(10, status=500)
    policy = sink_policy(_settings(standin))
    assert policy.max_attempts == 3
    with pytest.raises(SinkError) as err:
        create_ticket_with_retries(sink, _request(), policy, clock=FakeClock())
    assert err.value.retryable
    assert "500" in str(err.value)
    assert len(standin.requests) == 3
    assert standin.cases == {}


def test_bad_session_is_not_retried_and_never_leaks_the_secret(
    standin: SalesforceStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "00Dwrong!SECRET-session-value"
    monkeypatch.setenv("SALESFORCE_SESSION_ID", secret)
    http = requests.Session()
    http.verify = standin.ca_file
    sink = SalesforceSink.from_settings(_settings(standin), session=http)
    with pytest.raises(SinkError) as err:
        create_ticket_with_retries(sink, _request(), FAST, clock=FakeClock())
    assert not err.value.retryable
    assert "401" in str(err.value) and "INVALID_SESSION_ID" in str(err.value)
    assert secret not in str(err.value) and secret not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert len(standin.requests) == 1


def test_unknown_external_id_field_is_a_permanent_error(
    standin: SalesforceStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SALESFORCE_SESSION_ID", standin.session_id)
    http = requests.Session()
    http.verify = standin.ca_file
    sink = SalesforceSink.from_settings(_settings(standin, external_id_field="Nope__c"), session=http)
    with pytest.raises(SinkError) as err:
        sink.create_ticket(_request())
    assert not err.value.retryable and "NOT_FOUND" in str(err.value)


def test_slow_salesforce_times_out_as_retryable(
    standin: SalesforceStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SALESFORCE_SESSION_ID", standin.session_id)
    http = requests.Session()
    http.verify = standin.ca_file
    sink = SalesforceSink.from_settings(_settings(standin, timeout_s=0.2), session=http)
    standin.latency_s = 1.0
    with pytest.raises(SinkError) as err:
        sink.create_ticket(_request())
    assert err.value.retryable and "timed out" in str(err.value)


def test_connection_refused_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    standin = SalesforceStandin().start()
    url = standin.instance_url
    standin.stop()
    sink = SalesforceSink(instance_url=url, session_id="s3cr3t", timeout_s=1)
    with pytest.raises(SinkError) as err:
        sink.create_ticket(_request())
    assert err.value.retryable and "s3cr3t" not in str(err.value)


def test_untrusted_certificate_is_refused(standin: SalesforceStandin) -> None:
    # The default session does not trust the stand-in's private CA: TLS is really verified.
    sink = SalesforceSink(instance_url=standin.instance_url, session_id=standin.session_id, timeout_s=2)
    with pytest.raises(SinkError):
        sink.create_ticket(_request())
    assert standin.cases == {}


def test_missing_session_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SALESFORCE_SESSION_ID", raising=False)
    settings = Settings(sinks={"primary": "salesforce", "salesforce": {"instance_url": "https://x.example"}})
    with pytest.raises(SinkError, match="SALESFORCE_SESSION_ID"):
        build_sink(settings)


def test_helpdesk_is_the_default_and_deterministic() -> None:
    sink = build_sink(Settings())
    assert isinstance(sink, HelpdeskSink) and sink.name == "helpdesk"
    req = _request()
    assert sink.create_ticket(req) == sink.create_ticket(req) == f"HD-{req.email_key[:12]}"
    assert sink.create_ticket(_request(2)) != sink.create_ticket(req)
