"""A local Langfuse stand-in speaking the HTTP contract the official SDK 5 uses (research/langfuse.md §9).

- `POST /api/public/otel/v1/traces`: OTLP protobuf or JSON, optionally gzip; every span becomes an
  observation (upserted by trace id + span id), mapped like the real server (type, usage, session,
  user, model, metadata, input/output);
- `GET /api/public/v2/observations`: field groups, simple filters, the `filter` JSON subset, sort by
  start time descending, cursor paging;
- `GET /api/public/health` (no auth), `GET /api/public/projects`, `POST /api/public/scores`.

Everything but health needs HTTP Basic auth with the configured keys. Faults for tests:
`fail_next(n, status)` (with `retry_after` on 429/503), `latency_s` before every answer, `down`
(connections are closed without an answer). Standard library + opentelemetry-proto only.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_PUBLIC_KEY = "pk-lf-standin"
DEFAULT_SECRET_KEY = "sk-lf-standin"
PROJECT_ID = "standin-project"
SERVER_VERSION = "4.16.0"  # the server version this stand-in imitates
MAX_LIMIT = 1000  # largest `limit` the observations API accepts
DEFAULT_LIMIT = 50
METADATA_CHARS = 200  # metadata values longer than this are truncated unless expanded
MAX_INGESTION_VERSION = 4

OTEL_PATH = "/api/public/otel/v1/traces"
OBSERVATIONS_PATH = "/api/public/v2/observations"

# field group -> keys (core always included); see the SDK's observations.get_many docstring
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("id", "traceId", "startTime", "endTime", "projectId", "parentObservationId", "type"),
    "basic": ("name", "level", "statusMessage", "version", "environment", "bookmarked", "public", "userId",
              "sessionId", "isRootObservation"),
    "time": ("completionStartTime", "createdAt", "updatedAt"),
    "io": ("input", "output"),
    "metadata": ("metadata",),
    "model": ("model", "internalModelId", "modelParameters"),
    "usage": ("usageDetails", "costDetails", "totalCost", "usagePricingTierName"),
    "prompt": ("promptId", "promptName", "promptVersion"),
    "metrics": ("latency", "timeToFirstToken"),
    "trace_context": ("tags", "release", "traceName"),
}  # fmt: skip
ALWAYS_PRESENT = ("modelId", "inputPrice", "outputPrice", "totalPrice")

_OI_KINDS = {"LLM": "GENERATION", "CHAIN": "CHAIN", "AGENT": "AGENT", "TOOL": "TOOL", "RETRIEVER": "RETRIEVER",
             "EMBEDDING": "EMBEDDING", "GUARDRAIL": "GUARDRAIL", "EVALUATOR": "EVALUATOR"}  # fmt: skip
_GENAI_OPS = {"chat": "GENERATION", "completion": "GENERATION", "generate_content": "GENERATION",
              "embeddings": "EMBEDDING", "invoke_agent": "AGENT", "execute_tool": "TOOL"}  # fmt: skip
_MODEL_KEYS = ("langfuse.observation.model.name", "gen_ai.response.model", "ai.model.id", "gen_ai.request.model",
               "llm.response.model", "llm.model_name", "model")  # fmt: skip
_USAGE_KEYS = {"prompt_tokens": "input", "input_tokens": "input", "prompt": "input", "completion_tokens": "output",
               "output_tokens": "output", "completion": "output", "total_tokens": "total", "total": "total"}  # fmt: skip
_INPUT_KEYS = ("langfuse.observation.input", "input.value", "gen_ai.prompt", "gen_ai.input.messages")
_OUTPUT_KEYS = ("langfuse.observation.output", "output.value", "gen_ai.completion", "gen_ai.output.messages")
_METADATA_PREFIXES = ("langfuse.observation.metadata.", "langfuse.trace.metadata.", "langfuse.metadata.")
# `filter` column -> observation key (usage columns read usageDetails)
_FILTER_COLUMNS = {"traceTags": "tags", "inputTokens": ("usageDetails", "input"),
                   "outputTokens": ("usageDetails", "output"), "totalTokens": ("usageDetails", "total"),
                   "totalCost": "totalCost"}  # fmt: skip


class BadRequest(Exception):
    """A 400 answer."""


def iso(ns_or_dt: int | datetime) -> str:
    value = ns_or_dt if isinstance(ns_or_dt, datetime) else datetime.fromtimestamp(ns_or_dt / 1e9, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        raise BadRequest(f"invalid datetime: {text!r}") from None


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def decode_otlp(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """OTLP protobuf or JSON -> flat span dicts with resource and scope."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    try:
        if content_type.startswith("application/x-protobuf"):
            request.ParseFromString(body)
        elif content_type.startswith("application/json"):
            json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), request, ignore_unknown_fields=True)
        else:
            raise BadRequest("Invalid content type")
    except BadRequest:
        raise
    except Exception:
        raise BadRequest("Failed to parse OTel Trace") from None
    out = []
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "name": span.name,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano or None,
                        "attributes": _attributes(span.attributes),
                        "status_code": span.status.code,
                        "status_message": span.status.message or None,
                        "scope": ss.scope.name,
                        "resource": resource,
                    }
                )
    return out


def _hex_ids_to_base64(doc: Any) -> Any:
    """OTLP/JSON spells ids in hex; protobuf's JSON parser wants base64 for bytes fields."""
    if isinstance(doc, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str)
            else _hex_ids_to_base64(v)
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_hex_ids_to_base64(v) for v in doc]
    return doc


def _json_or_raw(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _observation_type(a: dict[str, Any]) -> str:
    if a.get("langfuse.observation.type"):
        return str(a["langfuse.observation.type"]).upper()
    if a.get("openinference.span.kind") in _OI_KINDS:
        return _OI_KINDS[a["openinference.span.kind"]]
    if a.get("gen_ai.operation.name") in _GENAI_OPS:
        return _GENAI_OPS[a["gen_ai.operation.name"]]
    if "gen_ai.tool.name" in a or "gen_ai.tool.call.id" in a:
        return "TOOL"
    return "GENERATION" if any(k in a for k in _MODEL_KEYS) else "SPAN"


def _usage(a: dict[str, Any]) -> dict[str, int]:
    if "langfuse.observation.usage_details" in a:
        raw = _json_or_raw(a["langfuse.observation.usage_details"])
        usage = {k: int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    else:
        usage = {}
        for key, value in a.items():
            for prefix in ("gen_ai.usage.", "llm.token_count."):
                if key.startswith(prefix) and isinstance(value, int | float):
                    suffix = key[len(prefix) :]
                    usage[_USAGE_KEYS.get(suffix, suffix.replace(".", "_"))] = int(value)
    if usage and "total" not in usage:
        usage["total"] = sum(usage.values())
    return usage


def span_to_observation(span: dict[str, Any]) -> dict[str, Any]:
    """One span as the server's observation row (research/langfuse.md §4.4)."""
    a, resource = span["attributes"], span["resource"]
    first = lambda keys: next((a[k] for k in keys if a.get(k) is not None), None)  # noqa: E731
    metadata = {}
    for key, value in a.items():
        for prefix in _METADATA_PREFIXES:
            if key.startswith(prefix):
                metadata[key[len(prefix) :]] = _json_or_raw(value)
    cost = _json_or_raw(a.get("langfuse.observation.cost_details"))
    cost = {k: float(v) for k, v in cost.items()} if isinstance(cost, dict) else {}
    start, end = span["start_ns"], span["end_ns"]
    level = a.get("langfuse.observation.level") or ("ERROR" if span["status_code"] == 2 else "DEFAULT")
    now = iso(time.time_ns())
    return {
        "id": span["span_id"],
        "traceId": span["trace_id"],
        "startTime": iso(start),
        "endTime": iso(end) if end else None,
        "projectId": PROJECT_ID,
        "parentObservationId": span["parent_span_id"],
        "type": _observation_type(a),
        "name": span["name"],
        "level": level,
        "statusMessage": a.get("langfuse.observation.status_message") or span["status_message"],
        "version": a.get("langfuse.version"),
        "environment": a.get("langfuse.environment") or resource.get("langfuse.environment") or "default",
        "bookmarked": False,
        "public": False,
        "userId": first(("langfuse.user.id", "user.id")),
        "sessionId": first(("langfuse.session.id", "session.id", "gen_ai.conversation.id")),
        "isRootObservation": span["parent_span_id"] is None,
        "completionStartTime": _json_or_raw(a.get("langfuse.observation.completion_start_time")),
        "createdAt": now,
        "updatedAt": now,
        "input": first(_INPUT_KEYS),
        "output": first(_OUTPUT_KEYS),
        "metadata": metadata,
        "model": first(_MODEL_KEYS),
        "internalModelId": None,
        "modelParameters": _json_or_raw(a.get("langfuse.observation.model.parameters")),
        "usageDetails": _usage(a),
        "costDetails": cost,
        "totalCost": cost.get("total", sum(cost.values())) if cost else None,
        "usagePricingTierName": None,
        "promptId": None,
        "promptName": a.get("langfuse.observation.prompt.name"),
        "promptVersion": a.get("langfuse.observation.prompt.version"),
        "latency": (end - start) / 1e9 if end else None,
        "timeToFirstToken": None,
        "tags": list(a.get("langfuse.trace.tags") or []),
        "release": a.get("langfuse.release") or resource.get("langfuse.release"),
        "traceName": a.get("langfuse.trace.name"),
    }


def _column_value(row: dict[str, Any], column: str, key: str | None) -> Any:
    target = _FILTER_COLUMNS.get(column, column)
    if isinstance(target, tuple):
        return (row.get(target[0]) or {}).get(target[1])
    value = row.get(target)
    if column == "metadata":
        value = (value or {}).get(key)
    if column in ("startTime", "endTime") and value:
        value = parse_time(value)
    return value


def _matches(row: dict[str, Any], cond: dict[str, Any]) -> bool:
    """One `filter` condition (the subset of operators watchers use)."""
    if not isinstance(cond, dict) or "column" not in cond or "operator" not in cond:
        raise BadRequest("invalid filter condition")
    op, want = cond["operator"], cond.get("value")
    value = _column_value(row, cond["column"], cond.get("key"))
    if cond.get("type") == "datetime" and isinstance(want, str):
        want = parse_time(want)
    if op in ("is null", "is not null"):
        return (value is None) == (op == "is null")
    if op in ("any of", "none of", "all of"):
        have = set(value) if isinstance(value, list) else {value}
        wanted = set(want or [])
        return {"any of": bool(have & wanted), "none of": not have & wanted, "all of": wanted <= have}[op]
    if op in ("contains", "does not contain", "starts with", "ends with"):
        text = value if isinstance(value, str) else json.dumps(value)
        hit = {"contains": want in text, "does not contain": want in text,
               "starts with": text.startswith(want), "ends with": text.endswith(want)}[op]  # fmt: skip
        return not hit if op == "does not contain" else hit
    if op in ("=", "!="):
        equal = str(value).lower() == str(want).lower() if isinstance(want, bool) else value == want
        return equal == (op == "=")
    if value is None:
        return False
    compare = {">": value.__gt__, "<": value.__lt__, ">=": value.__ge__, "<=": value.__le__}.get(op)
    if compare is None:
        raise BadRequest(f"unsupported filter operator {op!r}")
    return bool(compare(want))


def _simple_filters(q: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The simple query parameters as `filter` conditions."""
    conds: list[dict[str, Any]] = []
    for param, column in (("name", "name"), ("userId", "userId"), ("sessionId", "sessionId"), ("type", "type"),
                          ("traceId", "traceId"), ("level", "level"), ("version", "version")):  # fmt: skip
        if param in q:
            conds.append({"column": column, "operator": "=", "value": q[param][0]})
    if "environment" in q:
        conds.append({"column": "environment", "operator": "any of", "value": q["environment"]})
    if "parentObservationId" in q:
        value = q["parentObservationId"][0] or None
        conds.append({"column": "parentObservationId", "operator": "=", "value": value})
    if "isRootObservation" in q:
        want = q["isRootObservation"][0].lower() == "true"
        conds.append({"column": "isRootObservation", "operator": "=", "value": want})
    for param, op in (("fromStartTime", ">="), ("toStartTime", "<")):
        if param in q:
            conds.append({"type": "datetime", "column": "startTime", "operator": op, "value": q[param][0]})
    return conds


class LangfuseStandin:
    """The stand-in server. port 0 picks a free port; keys are what clients must authenticate with."""

    def __init__(
        self,
        port: int = 0,
        public_key: str = DEFAULT_PUBLIC_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.host, self.port = host, port
        self.public_key, self.secret_key = public_key, secret_key
        self.latency_s = 0.0  # added before every answer (a slow server)
        self.retry_after: float | None = 1.0  # Retry-After sent with injected 429/503 answers
        self.down = False  # True: connections are closed without an answer
        self._fail: list[int] = []
        self._lock = threading.Lock()
        self._observations: dict[tuple[str, str], dict[str, Any]] = {}
        self.scores: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> LangfuseStandin:
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.standin = self  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(
            target=server.serve_forever, name=f"langfuse-standin:{self.port}", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> LangfuseStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- faults and inspection ---------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next `n` authenticated requests with `status` (429/503 carry Retry-After)."""
        with self._lock:
            self._fail.extend([status] * n)

    def observations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(o) for o in self._observations.values()]

    def _take_failure(self) -> int | None:
        with self._lock:
            return self._fail.pop(0) if self._fail else None

    def _ingest(self, spans: list[dict[str, Any]]) -> None:
        with self._lock:
            for span in spans:
                self._observations[(span["trace_id"], span["span_id"])] = span_to_observation(span)

    def query(self, query: str) -> dict[str, Any]:
        """`GET /api/public/v2/observations` for a raw query string."""
        q = parse_qs(query, keep_blank_values=True)
        limit = int(q.get("limit", [DEFAULT_LIMIT])[0])
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
        if q.get("parseIoAsJson", ["false"])[0].lower() == "true":
            raise BadRequest("parseIoAsJson is no longer supported")
        try:
            conds = json.loads(q["filter"][0]) if "filter" in q else _simple_filters(q)
        except ValueError:
            raise BadRequest("filter must be a JSON array") from None
        if not isinstance(conds, list):
            raise BadRequest("filter must be a JSON array")
        rows = [r for r in self.observations() if all(_matches(r, c) for c in conds)]
        rows.sort(key=lambda r: (r["startTime"], r["traceId"], r["id"]), reverse=True)
        if "cursor" in q:
            try:
                c = json.loads(base64.b64decode(q["cursor"][0]))
                after = (c["lastStartTimeTo"], c["lastTraceId"], c["lastId"])
            except Exception:
                raise BadRequest("invalid cursor") from None
            rows = [r for r in rows if (r["startTime"], r["traceId"], r["id"]) < after]
        page, more = rows[:limit], len(rows) > limit
        groups = {"core", *(q.get("fields", ["core,basic"])[0].split(","))}
        expand = set(q.get("expandMetadata", [""])[0].split(","))
        keys = [k for g in groups for k in FIELD_GROUPS.get(g.strip(), ())]
        data = []
        for row in page:
            out = {k: row[k] for k in keys} | dict.fromkeys(ALWAYS_PRESENT)
            if "metadata" in out:
                out["metadata"] = {
                    k: v
                    if k in expand or len(json.dumps(v)) <= METADATA_CHARS
                    else json.dumps(v)[:METADATA_CHARS]
                    for k, v in out["metadata"].items()
                }
            data.append(out)
        meta: dict[str, Any] = {}
        if more:
            last = page[-1]
            token = {
                "lastStartTimeTo": last["startTime"],
                "lastTraceId": last["traceId"],
                "lastId": last["id"],
            }
            meta["cursor"] = base64.b64encode(json.dumps(token).encode()).decode()
        return {"data": data, "meta": meta}


class _Handler(BaseHTTPRequestHandler):
    server: Any
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return gzip.decompress(data) if self.headers.get("Content-Encoding", "").lower() == "gzip" else data

    def _authorized(self, standin: LangfuseStandin) -> bool:
        expected = base64.b64encode(f"{standin.public_key}:{standin.secret_key}".encode()).decode()
        return self.headers.get("Authorization", "") == f"Basic {expected}"

    def _handle(self, method: str) -> None:
        standin: LangfuseStandin = self.server.standin
        url = urlsplit(self.path)
        standin.requests.append((method, url.path))
        if standin.down:
            self.close_connection = True
            return
        if standin.latency_s:
            time.sleep(standin.latency_s)
        body = self._body() if method == "POST" else b""
        if url.path == "/api/public/health":
            return self._send(200, {"status": "OK", "version": SERVER_VERSION})
        if not self._authorized(standin):
            return self._send(
                401, {"message": "Invalid credentials. Confirm that you've configured the correct host."}
            )
        failure = standin._take_failure()
        if failure is not None:
            headers = (
                {"Retry-After": f"{standin.retry_after:g}"}
                if failure in (429, 503) and standin.retry_after
                else {}
            )
            return self._send(failure, {"message": f"injected failure {failure}"}, headers)
        try:
            self._route(standin, method, url.path, url.query, body)
        except BadRequest as exc:
            key = "error" if url.path == OTEL_PATH else "message"
            self._send(400, {key: str(exc)})

    def _route(self, standin: LangfuseStandin, method: str, path: str, query: str, body: bytes) -> None:
        if method == "POST" and path == OTEL_PATH:
            version = self.headers.get("x-langfuse-ingestion-version")
            if version and version.isdigit() and int(version) > MAX_INGESTION_VERSION:
                raise BadRequest(f"unsupported ingestion version {version}")
            standin._ingest(decode_otlp(body, self.headers.get("Content-Type", "")))
            return self._send(200, {})
        if method == "GET" and path == OBSERVATIONS_PATH:
            return self._send(200, standin.query(query))
        if method == "GET" and path == "/api/public/projects":
            org = {"id": "standin-org", "name": "standin"}
            return self._send(
                200, {"data": [{"id": PROJECT_ID, "name": "standin", "metadata": {}, "organization": org}]}
            )
        if method == "POST" and path == "/api/public/scores":
            try:
                doc = json.loads(body)
            except ValueError:
                raise BadRequest("invalid JSON body") from None
            items = doc if isinstance(doc, list) else [doc]
            with standin._lock:
                standin.scores.extend(i for i in items if isinstance(i, dict))
            return self._send(202, {"message": "Accepted"})
        self._send(404, {"message": "Not found"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")
