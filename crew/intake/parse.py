"""Turn raw RFC 822 bytes into the fields the crew needs, without ever raising.

Email is untrusted input: every header and part is read defensively (research/reliability.md §5).
Problems that still leave a usable message become `defects`; a message that cannot be used at
all (empty, too large, not an email, parser crash) gets a `parse_error` and goes to review.
The raw bytes are always kept by the caller as the evidence of record.
"""

from __future__ import annotations

import base64
import codecs
import email
import email.header
import email.policy
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.errors import InvalidBase64LengthDefect
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from html.parser import HTMLParser

#: The body handed to the crew is cut to this many characters.
BODY_MAX_CHARS = 20_000
#: Subject and sender are cut to this many characters.
HEADER_MAX_CHARS = 1_000
#: parse_error and defect texts are cut to this many characters.
ERROR_MAX_CHARS = 300
#: At most this much HTML is stripped of tags to make a body (the result is capped anyway).
HTML_SCAN_CHARS = 500_000
#: An oversize message's headers are read from at most this many leading bytes.
HEADER_SCAN_BYTES = 256 * 1024
#: A message needs at least one of these headers to count as an email.
KNOWN_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "sender",
        "reply-to",
        "received",
        "return-path",
        "mime-version",
        "content-type",
        "in-reply-to",
        "references",
        "delivered-to",
    }
)

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WHITESPACE_RUN = re.compile(r"[ \t\r\n]+")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_MESSAGE_ID_BRACKETS = re.compile(r"<([^<>]*)>")
_NON_BASE64 = re.compile(r"[^A-Za-z0-9+/]")


@dataclass(frozen=True)
class ParsedEmail:
    """What intake learned from one raw message.

    key: the email key (sha256 hex, DESIGN.md decision 6); message_id: the first Message-ID
    header as found (None when missing); subject, sender: decoded header text ("" if missing);
    body: plain text (text/plain preferred, else HTML stripped of tags), at most BODY_MAX_CHARS;
    attachments: attachment file names; defects: problems met while reading a usable message;
    parse_error: why the message cannot be processed (it goes to review), else None;
    truncated: the body was cut to BODY_MAX_CHARS or the message exceeded the size cap.
    """

    key: str
    message_id: str | None
    subject: str
    sender: str
    body: str
    attachments: list[str]
    defects: list[str]
    parse_error: str | None
    truncated: bool


# --------------------------------------------------------------------------- key


def normalize_message_id(value: str | None) -> str | None:
    """`<Local@Domain>` -> `Local@domain`; None when missing or not of the form left@right.

    A degenerate id (e.g. `<@>`) would merge unrelated emails into one key, so it counts as missing.
    """
    if value is None:
        return None
    text = _WHITESPACE_RUN.sub(" ", value).strip()
    bracketed = _MESSAGE_ID_BRACKETS.search(text)
    text = (bracketed.group(1) if bracketed else text.strip("<>")).strip()
    local, at, domain = text.rpartition("@")
    if not at or not local.strip() or not domain.strip():
        return None
    return f"{local}@{domain.lower()}"


def email_key(raw: bytes, message_id: str | None) -> str:
    """sha256 hex of the normalized Message-ID, or of the raw bytes when there is no usable one."""
    normalized = normalize_message_id(message_id)
    if normalized is None:
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(_to_bytes(normalized)).hexdigest()


def _to_bytes(text: str) -> bytes:
    # Header values keep undecodable 8-bit bytes as surrogate escapes: hash the original bytes.
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- parse


def parse_email(raw: bytes, *, max_bytes: int) -> ParsedEmail:
    """Parse `raw` defensively; never raises. `max_bytes`: larger messages are not parsed (review)."""
    try:
        return _parse(raw, max_bytes)
    except Exception as exc:  # the parser itself failed: keep the evidence, send to review
        return _unusable(raw, f"unparseable: {_describe(exc)}")


def _parse(raw: bytes, max_bytes: int) -> ParsedEmail:
    if not raw.strip():
        return _unusable(raw, "empty message" if not raw else "empty message (only whitespace)")
    if len(raw) > max_bytes:
        return _too_large(raw, max_bytes)
    head = _header_block(raw)
    if b"\x00" in head:
        return _unusable(raw, "not an email: binary data (NUL bytes) in the header block")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    names = {name.lower() for name, _ in msg.raw_items()}
    if not names:
        return _unusable(raw, "not an email: no header lines found")
    if not names & KNOWN_HEADERS:
        return _unusable(raw, "not an email: none of the standard headers (From, To, Subject, Date, ...)")

    defects: list[str] = []
    message_id = _message_id(msg, defects)
    subject = _header_text(msg, "subject", defects)
    sender = _header_text(msg, "from", defects)
    body_part, body = _body(msg, defects)
    attachments = _attachments(msg, body_part, defects)
    _collect_defects(msg, defects)
    truncated = len(body) > BODY_MAX_CHARS
    return ParsedEmail(
        key=email_key(raw, message_id),
        message_id=_clean_header(message_id) if message_id is not None else None,
        subject=subject,
        sender=sender,
        body=body[:BODY_MAX_CHARS],
        attachments=attachments,
        defects=_unique(defects),
        parse_error=None,
        truncated=truncated,
    )


def _unusable(
    raw: bytes,
    reason: str,
    *,
    message_id: str | None = None,
    subject: str = "",
    sender: str = "",
    truncated: bool = False,
) -> ParsedEmail:
    return ParsedEmail(
        key=email_key(raw, message_id),
        message_id=_clean_header(message_id) if message_id is not None else None,
        subject=subject,
        sender=sender,
        body="",
        attachments=[],
        defects=[],
        parse_error=_short(reason),
        truncated=truncated,
    )


def _too_large(raw: bytes, max_bytes: int) -> ParsedEmail:
    """Read only the header block of an oversize message, so a resend still dedupes by Message-ID."""
    reason = f"too large: {len(raw)} bytes > cap {max_bytes}"
    try:
        head = _header_block(raw[:HEADER_SCAN_BYTES])
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        ignored: list[str] = []
        return _unusable(
            raw,
            reason,
            message_id=_message_id(msg, ignored),
            subject=_header_text(msg, "subject", ignored),
            sender=_header_text(msg, "from", ignored),
            truncated=True,
        )
    except Exception:
        return _unusable(raw, reason, truncated=True)


def _header_block(raw: bytes) -> bytes:
    """The bytes before the first blank line (all of `raw` when there is none)."""
    ends = [i for i in (raw.find(b"\n\n"), raw.find(b"\r\n\r\n")) if i >= 0]
    return raw[: min(ends)] if ends else raw


# --------------------------------------------------------------------------- headers


def _raw_values(msg: Message, name: str) -> list[str]:
    """Header values as they arrived (no parsing, so nothing can raise)."""
    return [value for key, value in msg.raw_items() if key.lower() == name]


def _message_id(msg: Message, defects: list[str]) -> str | None:
    values = _raw_values(msg, "message-id")
    if not values:
        return None
    if len(values) > 1:
        defects.append(f"duplicate Message-ID headers ({len(values)}): the first is used")
    first = _WHITESPACE_RUN.sub(" ", values[0]).strip()
    if normalize_message_id(first) is None:
        defects.append("invalid Message-ID: the key is taken from the raw bytes")
    return first or None


def _header_text(msg: Message, name: str, defects: list[str]) -> str:
    """The decoded value of the first `name` header; on a parser crash, a best-effort decode."""
    try:
        value = msg.get(name)
        return "" if value is None else _clean_header(str(value))
    except Exception as exc:
        defects.append(f"header {name}: {_describe(exc)}")
    raw_values = _raw_values(msg, name)
    if not raw_values:
        return ""
    try:
        return _clean_header(str(email.header.make_header(email.header.decode_header(raw_values[0]))))
    except Exception:
        return _clean_header(raw_values[0])


# --------------------------------------------------------------------------- body


def _body(msg: EmailMessage, defects: list[str]) -> tuple[Message | None, str]:
    """The text/plain body, else HTML stripped of tags, else the first inline text part."""
    for preference in ("plain", "html"):
        try:
            part = msg.get_body(preferencelist=(preference,))
        except Exception as exc:
            defects.append(f"finding the {preference} body: {_describe(exc)}")
            part = None
        if part is None:
            continue
        text = _part_text(part, defects)
        if preference == "html":
            text = html_to_text(text)
        if text.strip():
            return part, _clean_body(text)
    for part in _leaves(msg, defects):
        ctype = _content_type(part)
        if ctype.startswith("text/") and _disposition(part) != "attachment":
            text = _part_text(part, defects)
            if ctype == "text/html":
                text = html_to_text(text)
        elif _is_broken_multipart(part):  # no boundary found: its raw text is all there is
            text = _raw_payload_text(part)
        else:
            continue
        if text.strip():
            return part, _clean_body(text)
    return None, ""


def _is_broken_multipart(part: Message) -> bool:
    """A multipart whose boundary was never found: the parser left its body as one string."""
    return _content_type(part).startswith("multipart/") and not part.is_multipart()


def _raw_payload_text(part: Message) -> str:
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def _part_text(part: Message, defects: list[str]) -> str:
    """A text part's content; an unknown charset or decode failure falls back to lossy UTF-8."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if any(isinstance(d, InvalidBase64LengthDefect) for d in part.defects):
            return _decode_lossy(_lenient_base64(part), _charset(part))  # stdlib returned it undecoded
        if isinstance(content, str):
            return content
        if isinstance(content, bytes):
            return content.decode("utf-8", errors="replace")
        return ""
    except LookupError:
        defects.append(f"unknown charset {_charset(part)!r} in {_content_type(part)}: decoded as UTF-8")
    except Exception as exc:
        defects.append(f"decoding {_content_type(part)}: {_describe(exc)}")
    try:
        payload = part.get_payload(decode=True)
    except Exception as exc:
        defects.append(f"payload of {_content_type(part)}: {_describe(exc)}")
        return ""
    if not isinstance(payload, bytes):
        return ""
    return _decode_lossy(payload, _charset(part))


def _lenient_base64(part: Message) -> bytes:
    """Decode a truncated base64 payload up to its last whole 4-character group."""
    payload = part.get_payload()
    chars = _NON_BASE64.sub("", payload if isinstance(payload, str) else "")
    return base64.b64decode(chars[: len(chars) // 4 * 4])


def _charset(part: Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:
        return None


def _decode_lossy(payload: bytes, charset: str | None) -> str:
    """Decode with the declared charset if it is a usable text codec, else UTF-8; bad bytes -> U+FFFD."""
    if charset:
        try:
            return payload.decode(codecs.lookup(charset).name, errors="replace")
        except Exception:  # unknown, not a text codec (rot13, hex), or no 'replace' support (idna)
            pass
    return payload.decode("utf-8", errors="replace")


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML document, skipping scripts and styles."""

    _SKIP = frozenset({"script", "style", "head", "title"})
    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment (tags, scripts and styles removed, entities decoded)."""
    extractor = _TextExtractor()
    try:
        extractor.feed(html[:HTML_SCAN_CHARS])
        extractor.close()
    except Exception:
        pass  # keep whatever text was collected before the markup went bad
    lines = (_WHITESPACE_RUN.sub(" ", line).strip() for line in "".join(extractor.chunks).split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------- attachments, defects


def _attachments(msg: Message, body_part: Message | None, defects: list[str]) -> list[str]:
    """Names of the non-body leaf parts that are attachments; decoding each surfaces its defects."""
    names: list[str] = []
    for part in _leaves(msg, defects):
        if part is body_part:
            continue
        ctype = _content_type(part)
        if _is_broken_multipart(part):
            continue  # its text is the body (or nothing): not an attachment
        try:
            filename = part.get_filename()
        except Exception as exc:
            defects.append(f"attachment name in {ctype}: {_describe(exc)}")
            filename = None
        if filename is None and _disposition(part) != "attachment" and ctype.startswith("text/"):
            continue  # an alternative inline text part, not an attachment
        names.append(_clean_header(filename) if filename else f"(unnamed {ctype})")
        try:
            part.get_payload(decode=True)  # registers e.g. InvalidBase64LengthDefect on the part
        except Exception as exc:
            defects.append(f"payload of {ctype}: {_describe(exc)}")
    return names


def _leaves(msg: Message, defects: list[str]) -> Iterator[Message]:
    """Every non-multipart part; a structure too deep or broken to walk is a defect, not a crash."""
    try:
        for part in msg.walk():
            if not part.is_multipart():
                yield part
    except Exception as exc:
        defects.append(f"walking the MIME structure: {_describe(exc)}")


def _collect_defects(msg: Message, defects: list[str]) -> None:
    try:
        for index, part in enumerate(msg.walk()):
            where = "message" if index == 0 else f"part {index} ({_content_type(part)})"
            defects.extend(f"{where}: {type(defect).__name__}" for defect in part.defects)
    except Exception as exc:
        defects.append(f"walking the MIME structure: {_describe(exc)}")


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


# --------------------------------------------------------------------------- text hygiene


def _safe_text(text: str) -> str:
    """Valid UTF-8 without NUL or control characters (PostgreSQL text refuses NUL)."""
    text = text.encode("utf-8", errors="replace").decode("utf-8")
    return _CONTROL_CHARS.sub("", text)


def _clean_header(text: str) -> str:
    return _WHITESPACE_RUN.sub(" ", _safe_text(text)).strip()[:HEADER_MAX_CHARS]


def _clean_body(text: str) -> str:
    return _safe_text(text.replace("\r\n", "\n"))


def _short(text: str) -> str:
    text = _clean_header(text)
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def _describe(exc: BaseException) -> str:
    return _short(f"{type(exc).__name__}: {exc}")


def _unique(items: list[str]) -> list[str]:
    return [_short(item) for item in dict.fromkeys(items)]
