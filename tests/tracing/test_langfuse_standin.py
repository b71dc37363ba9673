"""The Langfuse stand-in driven through the official SDK 5: ingestion, reads with paging and filters,
auth, scores and fault injection."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from langfuse import Langfuse, propagate_attributes
from langfuse.api.core.api_error import ApiError

from crewguard.standins.langfuse import LangfuseStandin


@pytest.fixture
def standin() -> Iterator[LangfuseStandin]:
    with LangfuseStandin(port=0, public_key="pk-lf-t", secret_key="sk-lf-t") as server:
        yield server


def client(standin: LangfuseStandin, **kwargs) -> Langfuse:
    from langfuse._client.resource_manager import LangfuseResourceManager

    LangfuseResourceManager._instances.pop(standin.public_key, None)  # one SDK client per key and process
    return Langfuse(
        public_key=standin.public_key, secret_key=standin.secret_key, base_url=standin.base_url, **kwargs
    )


def send_session(standin: LangfuseStandin, session: str, tools: int) -> None:
    lf = client(standin)
    with (
        lf.start_as_current_observation(as_type="agent", name="email-task"),
        propagate_attributes(session_id=session, metadata={"email_key": f"k-{session}"}),
    ):
        for i in range(tools):
            with lf.start_as_current_observation(as_type="tool", name="lookup", input={"q": i}):
                pass
        usage = {"input": 120, "output": 30}
        with lf.start_as_current_observation(
            as_type="generation", name="llm", model="gpt-4o-mini", usage_details=usage
        ):
            pass
    lf.shutdown()


def test_sdk_spans_become_observations_read_back_page_by_page(standin) -> None:
    send_session(standin, "s-1", tools=6)
    send_session(standin, "s-2", tools=1)
    api = client(standin, tracing_enabled=False).api
    seen, cursor, pages = [], None, 0
    while True:
        page = api.observations.get_many(
            session_id="s-1", fields="core,basic,usage,metadata,model", limit=3, cursor=cursor
        )
        seen.extend(page.data)
        pages += 1
        cursor = page.meta.cursor
        if not cursor:
            break
    # 6 tools, the generation, and the root (propagate_attributes also tags the current span)
    assert pages == 3 and len({o.id for o in seen}) == len(seen) == 8
    assert [o.start_time for o in seen] == sorted((o.start_time for o in seen), reverse=True)
    generation = next(o for o in seen if o.type == "GENERATION")
    assert (
        generation.usage_details == {"input": 120, "output": 30, "total": 150}
        and generation.model == "gpt-4o-mini"
    )
    assert {o.metadata["email_key"] for o in seen} == {"k-s-1"}
    only_tools = api.observations.get_many(
        filter=json.dumps(
            [
                {"type": "string", "column": "type", "operator": "=", "value": "TOOL"},
                {
                    "type": "stringObject",
                    "column": "metadata",
                    "key": "email_key",
                    "operator": "=",
                    "value": "k-s-2",
                },
            ]
        ),
        fields="core,basic,io",
    )
    assert [(o.type, o.session_id, json.loads(o.input)) for o in only_tools.data] == [
        ("TOOL", "s-2", {"q": 0})
    ]
    roots = api.observations.get_many(is_root_observation=True, fields="core,basic")
    assert sorted(o.name for o in roots.data) == ["email-task", "email-task"]
    assert "usageDetails" not in api.observations.get_many(limit=1).data[0].model_dump(
        by_alias=True, exclude_unset=True
    )


def test_auth_health_projects_and_scores(standin) -> None:
    lf = client(standin)
    assert lf.api.health.health().status == "OK"
    assert lf.auth_check()
    lf.create_score(name="supervisor_kill", value=1, session_id="s-9", data_type="BOOLEAN", comment="loop")
    lf.shutdown()
    assert [(s["name"], s.get("sessionId")) for s in standin.scores] == [("supervisor_kill", "s-9")]
    wrong = httpx.get(f"{standin.base_url}/api/public/v2/observations", auth=("pk-lf-t", "nope"))
    assert wrong.status_code == 401 and "message" in wrong.json()
    too_many = httpx.get(
        f"{standin.base_url}/api/public/v2/observations?limit=1001", auth=("pk-lf-t", "sk-lf-t")
    )
    assert too_many.status_code == 400


def test_injected_failures_and_retry_after(standin) -> None:
    standin.retry_after = 7
    standin.fail_next(1, 429)
    api = client(standin, tracing_enabled=False).api
    with pytest.raises(ApiError) as err:
        api.observations.get_many(request_options={"max_retries": 0})
    assert err.value.status_code == 429 and err.value.headers.get("retry-after") == "7"
    assert (
        api.observations.get_many(request_options={"max_retries": 0}).data == []
    )  # only the next one failed


def test_otlp_json_ingestion(standin) -> None:
    span = {
        "traceId": "0123456789abcdef0123456789abcdef",
        "spanId": "a1b2c3d4e5f60718",
        "name": "search_tool.run",
        "startTimeUnixNano": "1767225600000000000",
        "endTimeUnixNano": "1767225601500000000",
        "attributes": [
            {"key": "openinference.span.kind", "value": {"stringValue": "TOOL"}},
            {"key": "session.id", "value": {"stringValue": "run-42"}},
            {"key": "input.value", "value": {"stringValue": '{"query": "same"}'}},
        ],
    }
    body = {
        "resourceSpans": [
            {"resource": {}, "scopeSpans": [{"scope": {"name": "openinference"}, "spans": [span]}]}
        ]
    }
    response = httpx.post(
        f"{standin.base_url}/api/public/otel/v1/traces", json=body, auth=("pk-lf-t", "sk-lf-t")
    )
    assert response.status_code == 200
    [row] = standin.observations()
    assert (row["type"], row["sessionId"], row["latency"], row["startTime"]) == (
        "TOOL", "run-42", 1.5, "2026-01-01T00:00:00.000Z"
    )  # fmt: skip
