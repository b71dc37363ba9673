"""A local Slack Web API stand-in: auth.test, chat.postMessage and chat.update, as slack_sdk calls them.

Speaks the Web API's wire protocol: POST to `/api/<method>` with a form or JSON body, the
bot token in `Authorization: Bearer xoxb-…` (or a `token` form field), answers
`{"ok": true, ...}` or HTTP 200 `{"ok": false, "error": "invalid_auth"}`, and HTTP 429 with
`Retry-After` when rate limited. `down()` / `up()` stop and restart listening on the same port,
so clients see connection refused in between, as during a real outage.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

#: The bot token the stand-in accepts unless told otherwise.
DEFAULT_TOKEN = "xoxb-standin-0000-token"
#: Message timestamps start here (Slack's ts: epoch seconds with six decimals, unique per channel).
FIRST_TS_SECONDS = 1_700_000_000


@dataclass
class SlackMessage:
    channel: str  # channel id
    ts: str
    text: str
    thread_ts: str | None = None  # set on thread replies
    replies: list[str] = field(default_factory=list)  # ts of replies in this message's thread
    history: list[str] = field(default_factory=list)  # earlier texts, oldest first (chat.update)


class SlackStandin:
    """Start with `start()` (or as a context manager); point WebClient's base_url at `base_url`.

    port: 0 picks a free port (kept across down()/up()).
    """

    def __init__(self, port: int = 0, *, tokens: tuple[str, ...] = (DEFAULT_TOKEN,)) -> None:
        self.tokens = set(tokens)
        self.messages: dict[str, SlackMessage] = {}  # by ts; top-level messages and thread replies
        self.channels: dict[str, str] = {}  # name (without #) -> id
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (API method, parameters) of every request
        self._faults: list[tuple[int, str | None, float | None]] = []
        self._lock = threading.Lock()
        self._next = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self._bind()

    # --- lifecycle -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def _bind(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def start(self) -> SlackStandin:
        if self._server is None:
            self._bind()
        self._thread = threading.Thread(target=self._server.serve_forever, name="slack-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def down(self) -> None:
        """Stop listening: clients get connection refused until `up()`."""
        self.stop()

    def up(self) -> None:
        """Listen again on the same port."""
        self.start()

    def __enter__(self) -> SlackStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- fault injection and assertions ------------------------------------------------
    def fail_next(
        self, n: int, status: int = 503, *, error: str | None = None, retry_after: float | None = None
    ) -> None:
        """Answer the next `n` API calls with HTTP `status` (429 gets Retry-After, default 1 s);
        with status 200 and `error`, answer `{"ok": false, "error": error}`."""
        with self._lock:
            self._faults.extend([(status, error, retry_after)] * n)

    def top_level(self) -> list[SlackMessage]:
        with self._lock:
            return [m for m in self.messages.values() if m.thread_ts is None]

    def thread(self, ts: str) -> list[SlackMessage]:
        with self._lock:
            return [self.messages[r] for r in self.messages[ts].replies]

    # --- request handling (called from the server threads) ------------------------------
    def handle(
        self, method: str, params: dict[str, Any], auth: str | None
    ) -> tuple[int, dict[str, str], Any]:
        with self._lock:
            self.calls.append((method, {k: v for k, v in params.items() if k != "token"}))
            fault = self._faults.pop(0) if self._faults else None
            if fault is not None:
                status, error, retry_after = fault
                if status == 429:
                    wait = str(int(retry_after if retry_after is not None else 1))
                    return 429, {"Retry-After": wait}, {"ok": False, "error": "ratelimited"}
                return status, {}, {"ok": False, "error": error or "service_unavailable"}
            token = auth[len("Bearer ") :] if auth and auth.startswith("Bearer ") else params.get("token")
            if not token:
                return 200, {}, {"ok": False, "error": "not_authed"}
            if token not in self.tokens:
                return 200, {}, {"ok": False, "error": "invalid_auth"}
            handler = {
                "auth.test": self._auth_test,
                "chat.postMessage": self._post_message,
                "chat.update": self._update,
            }.get(method)
            if handler is None:
                return 404, {}, {"ok": False, "error": "unknown_method"}
            return 200, {}, handler(params)

    def _auth_test(self, _params: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://standin.slack.com/",
            "team": "Stand-in",
            "user": "crewguard",
            "team_id": "T0STANDIN",
            "user_id": "U0CREWGRD",
            "bot_id": "B0CREWGRD",
        }

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel_id(str(params.get("channel") or ""), create=True)
        if channel is None:
            return {"ok": False, "error": "channel_not_found"}
        text = params.get("text")
        if not text:
            return {"ok": False, "error": "no_text"}
        thread_ts = params.get("thread_ts") or None
        if thread_ts is not None:
            parent = self.messages.get(thread_ts)
            if parent is None or parent.channel != channel:
                return {"ok": False, "error": "invalid_thread_ts"}
            thread_ts = parent.thread_ts or parent.ts  # a reply to a reply lands in the same thread
        self._next += 1
        ts = f"{FIRST_TS_SECONDS + self._next}.000100"
        msg = SlackMessage(channel=channel, ts=ts, text=str(text), thread_ts=thread_ts)
        self.messages[ts] = msg
        if thread_ts is not None:
            self.messages[thread_ts].replies.append(ts)
        return {"ok": True, "channel": channel, "ts": ts, "message": _wire(msg)}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if channel not in self.channels.values():  # chat.update wants the channel id, not its name
            return {"ok": False, "error": "channel_not_found"}
        msg = self.messages.get(str(params.get("ts") or ""))
        if msg is None or msg.channel != channel:
            return {"ok": False, "error": "message_not_found"}
        if not params.get("text"):
            return {"ok": False, "error": "no_text"}
        msg.history.append(msg.text)
        msg.text = str(params["text"])
        return {"ok": True, "channel": channel, "ts": msg.ts, "text": msg.text, "message": _wire(msg)}

    def _channel_id(self, channel: str, *, create: bool) -> str | None:
        if channel in self.channels.values():
            return channel
        name = channel.lstrip("#")
        if not name or (channel.startswith("C") and channel.isupper()):
            return None  # an unknown id
        if name not in self.channels and create:
            self.channels[name] = f"C{len(self.channels) + 1:08d}"
        return self.channels.get(name)


def _wire(msg: SlackMessage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "message",
        "user": "U0CREWGRD",
        "bot_id": "B0CREWGRD",
        "text": msg.text,
        "ts": msg.ts,
    }
    if msg.thread_ts:
        out["thread_ts"] = msg.thread_ts
    if msg.history:
        out["edited"] = {"user": "U0CREWGRD", "ts": msg.ts}
    return out


def _handler_for(standin: SlackStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = (self.headers.get("Content-Type") or "").lower()
            if "json" in content_type:
                try:
                    params = json.loads(raw or b"{}")
                except ValueError:
                    params = None
                if not isinstance(params, dict):
                    self._reply(200, {}, {"ok": False, "error": "invalid_json"})
                    return
            else:
                params = dict(parse_qsl(raw.decode("utf-8", "replace")))
            path, _, query = self.path.partition("?")
            params = {**dict(parse_qsl(query)), **params}
            if not path.startswith("/api/"):
                self._reply(404, {}, {"ok": False, "error": "unknown_method"})
                return
            status, headers, body = standin.handle(
                path[len("/api/") :], params, self.headers.get("Authorization")
            )
            self._reply(status, headers, body)

        do_GET = do_POST

        def _reply(self, status: int, headers: dict[str, str], body: Any) -> None:
            out = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(out)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `calls`
            pass

    return Handler
