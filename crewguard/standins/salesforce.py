"""A local Salesforce REST stand-in: the sObject Case endpoints simple-salesforce calls, over HTTPS.

Implements what the Case sink needs, as the REST API behaves:
- `PATCH  /services/data/vXX.X/sobjects/Case/<ExtIdField>/<value>`: upsert on an External ID
  (201 created / 200 updated with `"created": false` / 300 when several records match /
  404 NOT_FOUND for a field that is not an External ID);
- `GET    /services/data/vXX.X/sobjects/Case/<ExtIdField>/<value>` and `.../Case/<Id>`;
- `POST   /services/data/vXX.X/sobjects/Case/`: a plain create (not idempotent: twice = two cases).
Every request needs `Authorization: Bearer <session id>` (401 INVALID_SESSION_ID otherwise).
simple-salesforce forces https, so the server speaks TLS with a throwaway CA (`ca_file`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from crewguard.standins.tls import LocalTls, make_local_tls

#: The session id the stand-in accepts unless told otherwise.
DEFAULT_SESSION_ID = "00Dstandin!session.token"
#: External ID fields defined on Case in the stand-in org.
DEFAULT_EXTERNAL_ID_FIELDS = ("Support_Email_Key__c",)

#: Before this API version an upsert that updated a record answered 204 with no body.
UPDATE_BODY_SINCE_VERSION = 46.0

_PATH = re.compile(r"^/services/data/v(\d+\.\d+)/sobjects/(\w+)/?(.*)$")


class SalesforceStandin:
    """Start with `start()` (or as a context manager); `instance_url` and `ca_file` configure clients.

    port: 0 picks a free port. tls: False serves plain HTTP (only for adapter-level tests).
    """

    def __init__(
        self,
        port: int = 0,
        tls: bool = True,
        *,
        session_id: str = DEFAULT_SESSION_ID,
        external_id_fields: tuple[str, ...] = DEFAULT_EXTERNAL_ID_FIELDS,
    ) -> None:
        self.session_id = session_id
        self.external_id_fields = set(external_id_fields)
        self.cases: dict[str, dict[str, Any]] = {}  # Case Id -> fields
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self.latency_s = 0.0  # added before every response
        self._faults: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()
        self._next_id = 1
        self._tls: LocalTls | None = make_local_tls() if tls else None
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        if self._tls is not None:
            self._server.socket = self._tls.server_context().wrap_socket(
                self._server.socket, server_side=True
            )
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------
    @property
    def instance_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str | None:
        return self._tls.ca_file if self._tls else None

    def start(self) -> SalesforceStandin:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="salesforce-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SalesforceStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- fault injection and assertions ------------------------------------------------
    def fail_next(self, n: int, status: int = 503, error_code: str | None = None) -> None:
        """Answer the next `n` requests with `status` (and a Salesforce error body with `error_code`)."""
        with self._lock:
            self._faults.extend([(status, error_code)] * n)

    def cases_with(self, field: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c) for c in self.cases.values() if c.get(field) == value]

    # --- request handling (called from the server threads) ------------------------------
    def handle(self, method: str, path: str, auth: str | None, body: bytes) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
            fault = self._faults.pop(0) if self._faults else None
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault is not None:
            status, code = fault
            return status, [{"errorCode": code or _default_code(status), "message": "injected fault"}]
        if auth != f"Bearer {self.session_id}":
            return 401, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
        m = _PATH.match(path.split("?", 1)[0])
        if not m or m.group(2) != "Case":
            return 404, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
        version = m.group(1)
        rest = [unquote(p) for p in m.group(3).split("/") if p]
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return 400, [{"errorCode": "JSON_PARSER_ERROR", "message": "malformed JSON"}]
        with self._lock:
            if method == "POST" and not rest:
                return 201, {"id": self._insert(data), "success": True, "errors": []}
            if len(rest) == 1 and method == "GET":
                case = self.cases.get(rest[0])
                return (200, _record(version, rest[0], case)) if case else (404, _not_found())
            if len(rest) == 2 and method in ("PATCH", "GET"):
                return self._by_external_id(version, method, rest[0], rest[1], data)
        return 405, [{"errorCode": "METHOD_NOT_ALLOWED", "message": f"HTTP Method '{method}' not allowed"}]

    def _by_external_id(
        self, version: str, method: str, field: str, value: str, data: dict[str, Any]
    ) -> tuple[int, Any]:
        if field not in self.external_id_fields:
            return 404, [
                {
                    "errorCode": "NOT_FOUND",
                    "message": f"Provided external ID field does not exist or is not accessible: {field}",
                }
            ]
        matches = [cid for cid, c in self.cases.items() if c.get(field) == value]
        if len(matches) > 1:
            base = f"/services/data/v{version}/sobjects/Case/"
            return 300, [base + cid for cid in matches]
        if method == "GET":
            return (
                (200, _record(version, matches[0], self.cases[matches[0]]))
                if matches
                else (404, _not_found())
            )
        if field in data or "Id" in data:
            return 400, [
                {"errorCode": "INVALID_FIELD", "message": "Id and the External ID belong in the URL"}
            ]
        if matches:
            self.cases[matches[0]].update(data)
            if float(version) < UPDATE_BODY_SINCE_VERSION:
                return 204, None
            return 200, {"id": matches[0], "success": True, "errors": [], "created": False}
        return 201, {
            "id": self._insert({**data, field: value}),
            "success": True,
            "errors": [],
            "created": True,
        }

    def _insert(self, data: dict[str, Any]) -> str:
        case_id = f"500Sd{self._next_id:013d}"
        self._next_id += 1
        self.cases[case_id] = dict(data)
        return case_id


def _record(version: str, case_id: str, case: dict[str, Any]) -> dict[str, Any]:
    return {
        "attributes": {"type": "Case", "url": f"/services/data/v{version}/sobjects/Case/{case_id}"},
        "Id": case_id,
        **case,
    }


def _not_found() -> list[dict[str, str]]:
    return [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]


def _default_code(status: int) -> str:
    return {401: "INVALID_SESSION_ID", 403: "REQUEST_LIMIT_EXCEEDED", 404: "NOT_FOUND"}.get(
        status, "SERVER_UNAVAILABLE" if status >= 500 else "BAD_REQUEST"
    )


def _handler_for(standin: SalesforceStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload = standin.handle(self.command, self.path, self.headers.get("Authorization"), body)
            out = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            if out:
                self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests`
            pass

    return Handler
