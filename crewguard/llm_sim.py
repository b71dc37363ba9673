"""The scenario LLM: an OpenAI-compatible chat-completions server that misbehaves on request.

Endpoints: `POST /v1/chat/completions` (native tool calls, `usage`, optional SSE streaming with
tool-call deltas and a final usage chunk) and `GET /v1/models`. What it answers is decided by a
scenario (crewguard.llm_sim_scenarios.SCENARIOS), chosen in this order:

1. the URL path prefix `/scenario/<name>/v1/...` (a whole client gets one scenario);
2. the first marker `[[sim:<name>]]` or `[[sim:<name>=<number>]]` in the request's messages
   (emails of the demo mailbox carry it in their body);
3. the server's `default_scenario` ("normal").

Unknown scenario names are answered with HTTP 400. Standard library only (ThreadingHTTPServer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from crewguard.llm_sim_scenarios import (
    DEFAULT_SCENARIO,
    MARKER,
    Answer,
    Failure,
    Garbage,
    Hang,
    Reply,
    Scenario,
    ScenarioError,
    email_key,
    messages_text,
    parse_scenario,
    respond,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765  # the port config/crewguard.yaml's llm.base_url points at
# how often a waiting request (and the accept loop) checks whether its client left or the server is stopping
POLL_S = 0.1
# characters of content (or tool arguments) per streamed chunk
STREAM_PIECE_CHARS = 24
# model ids listed by GET /v1/models (any model name is accepted on chat requests)
MODEL_IDS = ("gpt-4o-mini", "crewguard-sim")
# the body `malformed` sends with status 200
GARBAGE_BODY = (
    b'{"id": "chatcmpl-sim", "object": "chat.completion", "choices": [{"index": 0, "message": {"con'
)
# largest request body accepted
MAX_BODY_BYTES = 16 * 1024 * 1024

_CHAT_PATH = re.compile(r"^(?:/scenario/([^/]+))?/v1/chat/completions/?$")
_MODELS_PATH = re.compile(r"^(?:/scenario/([^/]+))?/v1/models/?$")


class ScenarioLLM:
    """An in-process scenario LLM server (start/stop it around tests, or use it as a context manager)."""

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        latency_s: float = 0.0,
        default_scenario: str = DEFAULT_SCENARIO,
    ) -> None:
        """host/port: where to listen (port 0 picks a free one); latency_s: added to every chat answer;
        default_scenario: used when neither the path nor the messages choose one (may carry `=<number>`)."""
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.default_scenario = parse_scenario(default_scenario)
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._attempts: dict[tuple[str, str], int] = {}
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> ScenarioLLM:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("ScenarioLLM already started")
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        server.sim = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(POLL_S,), name=f"llm-sim:{self.port}", daemon=True
        )
        self._thread.start()
        log.info("scenario LLM listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving: waiting requests (hang, slow) end, open connections are closed."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ScenarioLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:8765/v1."""
        return f"http://{self.host}:{self.port}/v1"

    def scenario_url(self, scenario: str) -> str:
        """A base URL that forces one scenario for every request of a client."""
        parse_scenario(scenario)
        return f"http://{self.host}:{self.port}/scenario/{scenario}/v1"

    # -- what was received -------------------------------------------------------------------------
    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every chat request body received so far (a copy)."""
        with self._lock:
            return list(self._requests)

    def calls(self, marker: str | None = None) -> int:
        """How many chat requests arrived (only those whose messages contain `marker`, when given)."""
        bodies = self.requests
        if marker is None:
            return len(bodies)
        return sum(1 for body in bodies if marker in messages_text(body))

    # -- used by the handler -----------------------------------------------------------------------
    def _record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(body)

    def _next_attempt(self, body: dict[str, Any], scenario: Scenario) -> int:
        """The 1-based number of this request among those for (scenario, email)."""
        key = (scenario.name, email_key(body))
        with self._lock:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            return self._attempts[key]

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    sim: ScenarioLLM


def _choose_scenario(path_scenario: str | None, body: dict[str, Any], default: Scenario) -> Scenario:
    if path_scenario is not None:
        return parse_scenario(path_scenario)
    marker = MARKER.search(messages_text(body))
    return parse_scenario(marker.group(1)) if marker else default


def _error_body(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = (
        True  # headers and body are separate writes: Nagle + delayed ACK cost 40 ms each
    )
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.sim._track(self.connection, True)

    def finish(self) -> None:
        self.server.sim._track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    # -- routes ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        match = _MODELS_PATH.match(self.path.split("?", 1)[0])
        if not match:
            self._send_json(404, _error_body(f"no route GET {self.path}", "invalid_request_error"))
            return
        created = int(time.time())
        models = [
            {"id": m, "object": "model", "created": created, "owned_by": "crewguard-llm-sim"}
            for m in MODEL_IDS
        ]
        self._send_json(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        match = _CHAT_PATH.match(self.path.split("?", 1)[0])
        raw = self._read_raw_body()
        if raw is None:
            return
        if not match:
            self._send_json(404, _error_body(f"no route POST {self.path}", "invalid_request_error"))
            return
        body = self._parse_body(raw)
        if body is None:
            return
        sim = self.server.sim
        sim._record(body)
        try:
            scenario = _choose_scenario(match.group(1), body, sim.default_scenario)
        except ScenarioError as exc:
            self._send_json(400, _error_body(str(exc), "invalid_request_error", "unknown_scenario"))
            return
        attempt = sim._next_attempt(body, scenario)
        reply = respond(body, scenario, attempt)
        log.debug("scenario %s attempt %d -> %s", scenario.name, attempt, type(reply).__name__)
        if isinstance(reply, Hang):
            self._wait(reply.seconds)
            self.close_connection = True  # never answered
            return
        delay = sim.latency_s + (reply.delay_s if isinstance(reply, Answer) else 0.0)
        if delay > 0 and not self._wait(delay):
            self.close_connection = True
            return
        self._send_reply(reply, body)

    # -- helpers -----------------------------------------------------------------------------------
    def _read_raw_body(self) -> bytes | None:
        """The request body, or None after answering 400 (bad Content-Length)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._send_json(400, _error_body("missing or invalid Content-Length", "invalid_request_error"))
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _parse_body(self, raw: bytes) -> dict[str, Any] | None:
        """The JSON chat request, or None after answering 400."""
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            self._send_json(400, _error_body(f"request body is not JSON: {exc}", "invalid_request_error"))
            return None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            message = "request body must be a JSON object with a non-empty 'messages' list"
            self._send_json(400, _error_body(message, "invalid_request_error"))
            return None
        return body

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; False as soon as the server stops or the client goes away."""
        stopping = self.server.sim._stopping
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if stopping.wait(min(POLL_S, remaining)) or self._client_gone():
                return False
        return not stopping.is_set()

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:20]}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._write(data)

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client left; nothing to tell it
            self.close_connection = True
            return False

    def _send_reply(self, reply: Reply, body: dict[str, Any]) -> None:
        if isinstance(reply, Failure):
            headers = {"Retry-After": str(reply.retry_after_s)} if reply.retry_after_s is not None else {}
            self._send_json(reply.status, _error_body(reply.message, reply.error_type, reply.code), headers)
        elif isinstance(reply, Garbage):
            self._send_garbage(streaming=bool(body.get("stream")))
        elif isinstance(reply, Answer):
            model = str(body.get("model") or MODEL_IDS[0])
            if body.get("stream"):
                options = body.get("stream_options") or {}
                self._send_stream(reply, model, include_usage=bool(options.get("include_usage")))
            else:
                self._send_json(200, completion(reply, model))

    def _send_garbage(self, streaming: bool) -> None:
        data = b"data: " + GARBAGE_BODY + b"\n\n" if streaming else GARBAGE_BODY
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if streaming else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._write(data)

    def _send_stream(self, reply: Answer, model: str, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        for chunk in stream_chunks(reply, model, include_usage):
            if not self._write(b"data: " + json.dumps(chunk).encode() + b"\n\n"):
                return
        self._write(b"data: [DONE]\n\n")


def _usage(reply: Answer) -> dict[str, int]:
    total = reply.prompt_tokens + reply.completion_tokens
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": total,
    }


def _tool_call_dicts(reply: Answer) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in reply.tool_calls
    ]


def completion(reply: Answer, model: str) -> dict[str, Any]:
    """A `chat.completion` object for an answer."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = _tool_call_dicts(reply)
    return {
        "id": f"chatcmpl-sim{uuid.uuid4().hex[:20]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": _usage(reply),
        "system_fingerprint": "fp_crewguard_sim",
    }


def _pieces(text: str) -> Iterator[str]:
    for start in range(0, len(text), STREAM_PIECE_CHARS):
        yield text[start : start + STREAM_PIECE_CHARS]


def stream_chunks(reply: Answer, model: str, include_usage: bool) -> Iterator[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a streamed answer, in order (without `[DONE]`)."""
    base = {"id": f"chatcmpl-sim{uuid.uuid4().hex[:20]}", "object": "chat.completion.chunk"}
    base |= {"created": int(time.time()), "model": model, "system_fingerprint": "fp_crewguard_sim"}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return base | {"choices": [choice]} | ({"usage": None} if include_usage else {})

    if reply.tool_calls:
        yield chunk({"role": "assistant", "content": None})
        for index, call in enumerate(_tool_call_dicts(reply)):
            function = call["function"]
            head = {"index": index, "id": call["id"], "type": "function"}
            yield chunk({"tool_calls": [head | {"function": {"name": function["name"], "arguments": ""}}]})
            for piece in _pieces(function["arguments"]):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        yield chunk({}, "tool_calls")
    else:
        yield chunk({"role": "assistant", "content": ""})
        for piece in _pieces(reply.content or ""):
            yield chunk({"content": piece})
        yield chunk({}, "stop")
    if include_usage:
        yield base | {"choices": [], "usage": _usage(reply)}


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    latency_s: float = 0.0,
    default_scenario: str = DEFAULT_SCENARIO,
) -> None:
    """Run the scenario LLM in the foreground until SIGINT or SIGTERM (`crewguard llm-sim`)."""
    sim = ScenarioLLM(host, port, latency_s=latency_s, default_scenario=default_scenario).start()
    done = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"scenario LLM listening on {sim.base_url} (default scenario: {default_scenario})", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m crewguard.llm_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat answer")
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO, help="default scenario")
    arguments = parser.parse_args()
    serve(arguments.host, arguments.port, arguments.latency, arguments.scenario)
