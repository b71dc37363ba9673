"""parse_email never raises: every nasty message becomes defects or a parse_error, never a crash."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest

from crewguard.crew.intake.parse import (
    BODY_MAX_CHARS,
    ParsedEmail,
    email_key,
    html_to_text,
    normalize_message_id,
    parse_email,
)

CAP = 1024 * 1024


def parse(raw: bytes, cap: int = CAP) -> ParsedEmail:
    return parse_email(raw, max_bytes=cap)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_storable(p: ParsedEmail) -> None:
    """Every text field is valid UTF-8 without NUL (PostgreSQL text refuses NUL and surrogates)."""
    for text in (p.subject, p.sender, p.body, p.message_id or "", p.parse_error or "", *p.defects):
        text.encode("utf-8")  # raises on lone surrogates
        assert "\x00" not in text


SIMPLE = (
    b"From: Jos\xc3\xa9 <jose@example.com>\r\n"
    b"To: support@example.com\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9_order?= broken\r\n"
    b"Message-ID: <Order-42@Mail.Example.COM>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"My order #42 arrived broken.\r\n"
)


def test_simple_message_fields() -> None:
    p = parse(SIMPLE)
    assert p.parse_error is None
    assert p.subject == "Café order broken"
    assert "jose@example.com" in p.sender
    assert p.body.strip() == "My order #42 arrived broken."
    assert p.message_id == "<Order-42@Mail.Example.COM>"
    assert p.key == sha(b"Order-42@mail.example.com")
    assert p.attachments == [] and p.defects == [] and not p.truncated


# --------------------------------------------------------------------------- key


def test_email_key_normalizes_message_id() -> None:
    raw = b"irrelevant"
    assert email_key(raw, "<Abc@Example.COM>") == email_key(b"other", "  <Abc@example.com>\r\n ")
    assert email_key(raw, "<Abc@example.com>") == sha(b"Abc@example.com")
    # the local part is case-sensitive, the domain is not
    assert email_key(raw, "<abc@example.com>") != email_key(raw, "<ABC@example.com>")
    assert email_key(raw, "Abc@example.com") == email_key(raw, "<Abc@example.com>")


@pytest.mark.parametrize("mid", [None, "", "   ", "<>", "<@>", "<abc>", "<@example.com>", "<abc@>"])
def test_email_key_falls_back_to_raw_bytes(mid: str | None) -> None:
    assert normalize_message_id(mid) is None
    assert email_key(b"raw bytes", mid) == sha(b"raw bytes")


def test_missing_message_id_keys_on_raw_bytes() -> None:
    raw = b"From: a@example.com\nSubject: no id\n\nhello\n"
    p = parse(raw)
    assert p.parse_error is None
    assert p.message_id is None
    assert p.key == sha(raw)
    assert parse(raw + b" ").key != p.key  # different bytes, different email


def test_duplicate_message_id_uses_first_and_records_defect() -> None:
    raw = b"From: a@example.com\nMessage-ID: <first@example.com>\nMessage-ID: <second@example.com>\n\nx\n"
    p = parse(raw)
    assert p.parse_error is None
    assert p.key == sha(b"first@example.com")
    assert any("duplicate Message-ID" in d for d in p.defects)


def test_degenerate_message_id_keys_on_raw_bytes() -> None:
    # `<@>` also crashes the stdlib header parser (IndexError) when read through msg["message-id"].
    raw = b"From: a@example.com\nMessage-ID: <@>\nSubject: hi\n\nx\n"
    p = parse(raw)
    assert p.parse_error is None
    assert p.key == sha(raw)
    assert any("invalid Message-ID" in d for d in p.defects)


# --------------------------------------------------------------------------- charsets and headers


@pytest.mark.parametrize("charset", ["bogus-charset", "rot13", "hex"])
def test_unknown_charset_decodes_with_replacement(charset: str) -> None:
    raw = (
        b"From: a@example.com\nMessage-ID: <c@example.com>\n"
        b"Content-Type: text/plain; charset=" + charset.encode() + b"\n\ncaf\xc3\xa9 \xff ok\n"
    )
    p = parse(raw)
    assert p.parse_error is None
    assert p.body.strip() == "café \ufffd ok"
    assert any(f"unknown charset {charset!r}" in d for d in p.defects)
    assert_storable(p)


def test_a_part_whose_decoder_raises_is_a_defect() -> None:
    # The idna codec refuses errors="replace": get_content() raises UnicodeError, not LookupError.
    raw = b"From: a@example.com\nContent-Type: text/plain; charset=idna\n\nhello \xff there\n"
    p = parse(raw)
    assert p.parse_error is None
    assert p.body.strip() == "hello \ufffd there"
    assert any("UnicodeError" in d for d in p.defects)


def test_raw_8bit_and_non_utf8_headers() -> None:
    raw = (
        b"From: Ren\xe9 <rene@example.com>\n"
        b"Subject: caf\xc3\xa9 and raw \xe9t\xe9 bytes\n"
        b"Message-ID: <8bit-\xe9@Example.com>\n"
        b"\nbody\n"
    )
    p = parse(raw)
    assert p.parse_error is None
    assert p.subject.startswith("caf") and "\ufffd" in p.subject
    assert "rene@example.com" in p.sender
    # the key hashes the original bytes of the id, domain lower-cased
    assert p.key == sha(b"8bit-\xe9@example.com")
    assert_storable(p)


@pytest.mark.parametrize(
    "bad_header",
    [
        b"From: <",  # IndexError inside email._header_value_parser (3.11)
        b"From: a@[",  # AttributeError inside the address parser
    ],
)
def test_header_parser_exception_is_a_defect(bad_header: bytes) -> None:
    raw = (
        bad_header + b"\nSubject: still here\nDate: Mon, 1 Jan 99999999999 00:00:00 +0000\nTo: a@[\n\nbody\n"
    )
    p = parse(raw)
    assert p.parse_error is None
    assert p.subject == "still here"
    assert p.sender == bad_header.split(b": ", 1)[1].decode()  # best-effort raw value
    assert any(d.startswith("header from:") for d in p.defects)
    assert p.body.strip() == "body"


def test_control_characters_in_headers_are_removed() -> None:
    raw = b"From: a@example.com\nSubject: bell\x07 and\x1b escape\n\nx\n"
    p = parse(raw)
    assert p.subject == "bell and escape"
    assert_storable(p)


# --------------------------------------------------------------------------- body and attachments


def test_broken_base64_attachment_records_defect() -> None:
    raw = (
        b"From: a@example.com\nMessage-ID: <b64@example.com>\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=XX\n\n"
        b"--XX\nContent-Type: text/plain\n\nsee attached\n"
        b"--XX\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=invoice.pdf\n"
        b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK!!!=\n"
        b"--XX--\n"
    )
    p = parse(raw)
    assert p.parse_error is None
    assert p.body.strip() == "see attached"
    assert p.attachments == ["invoice.pdf"]
    assert any("InvalidBase64" in d for d in p.defects)


def test_broken_base64_body_is_a_defect_not_a_crash() -> None:
    raw = (
        b"From: a@example.com\nContent-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.b64encode(b"hello world")[:-3] + b"\n"
    )
    p = parse(raw)
    assert p.parse_error is None
    assert p.body.startswith("hello")
    assert any("InvalidBase64" in d for d in p.defects)


def test_plain_text_is_preferred_over_html() -> None:
    raw = (
        b"From: a@example.com\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=B\n\n"
        b"--B\nContent-Type: text/html\n\n<p>the html</p>\n"
        b"--B\nContent-Type: text/plain\n\nthe plain text\n"
        b"--B--\n"
    )
    p = parse(raw)
    assert p.body.strip() == "the plain text"
    assert p.attachments == []


def test_html_only_is_stripped_of_tags() -> None:
    raw = (
        b"From: a@example.com\nContent-Type: text/html; charset=utf-8\n\n"
        b"<html><head><style>p{color:red}</style><script>alert('x')</script></head>"
        b"<body><p>Refund &amp; return</p><p>order <b>#7</b></p></body></html>\n"
    )
    p = parse(raw)
    assert p.body == "Refund & return\n\norder #7"


def test_html_to_text_survives_broken_markup() -> None:
    assert html_to_text("<p>ok <b>bold <<<>>> </unclosed").startswith("ok bold")


def test_body_is_capped() -> None:
    raw = b"From: a@example.com\nSubject: long\n\n" + b"x" * (BODY_MAX_CHARS + 500)
    p = parse(raw)
    assert p.parse_error is None
    assert len(p.body) == BODY_MAX_CHARS
    assert p.truncated


def test_attachment_only_message_has_empty_body_and_names_the_attachment() -> None:
    raw = (
        b"From: a@example.com\nSubject: scan\nContent-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n\nAAEC\n"
    )
    p = parse(raw)
    assert p.parse_error is None
    assert p.body == ""
    assert p.attachments == ["(unnamed application/octet-stream)"]


def test_multipart_without_boundary_keeps_its_text() -> None:
    raw = b"From: a@example.com\nSubject: nb\nContent-Type: multipart/mixed\n\nthe only text\n"
    p = parse(raw)
    assert p.parse_error is None
    assert p.body.strip() == "the only text"
    assert any("NoBoundaryInMultipartDefect" in d for d in p.defects)


# --------------------------------------------------------------------------- unusable input


def test_oversize_is_not_parsed_and_keeps_headers() -> None:
    raw = b"From: big@example.com\nSubject: huge\nMessage-ID: <Big@Example.com>\n\n" + b"A" * 5000
    p = parse(raw, cap=1000)
    assert p.parse_error == f"too large: {len(raw)} bytes > cap 1000"
    assert p.key == sha(b"Big@example.com")  # a resend of the same message still dedupes
    assert p.subject == "huge" and p.sender == "big@example.com"
    assert p.body == "" and p.truncated


def test_oversize_without_headers_still_has_a_key() -> None:
    raw = bytes(range(256)) * 10
    p = parse(raw, cap=100)
    assert p.parse_error is not None and p.parse_error.startswith("too large")
    assert p.key == sha(raw)


@pytest.mark.parametrize(("raw", "reason"), [(b"", "empty message"), (b" \r\n\t\n", "empty message")])
def test_empty_input(raw: bytes, reason: str) -> None:
    p = parse(raw)
    assert p.parse_error is not None and p.parse_error.startswith(reason)
    assert p.key == sha(raw)


def test_no_headers_at_all() -> None:
    p = parse(b"hello, this is just some text\nwith two lines\n")
    assert p.parse_error == "not an email: no header lines found"


def test_headers_that_are_not_email_headers() -> None:
    p = parse(b"name: value\nother: thing\n\nbody\n")
    assert p.parse_error is not None and p.parse_error.startswith("not an email")


@pytest.mark.parametrize("seed", range(20))
def test_binary_garbage_is_not_an_email(seed: int) -> None:
    raw = random.Random(seed).randbytes(4096)
    p = parse(raw)
    assert p.parse_error is not None and p.parse_error.startswith("not an email")
    assert p.key == sha(raw)
    assert_storable(p)


def test_nul_bytes_in_the_header_block() -> None:
    p = parse(b"From: a\x00b@example.com\nSubject: x\n\nbody\n")
    assert p.parse_error is not None and "NUL" in p.parse_error


def test_parser_recursion_is_a_parse_error() -> None:
    # 3,000 nested multiparts exhaust the stdlib parser's recursion: review, not a crash.
    nested = b"".join(
        f"--b{i}\nContent-Type: multipart/mixed; boundary=b{i + 1}\n\n".encode() for i in range(3000)
    )
    raw = b"From: a@example.com\nContent-Type: multipart/mixed; boundary=b0\n\n" + nested + b"--b3000\n\nhi\n"
    p = parse(raw, cap=10 * CAP)
    assert p.parse_error is not None and p.parse_error.startswith("unparseable: RecursionError")
    assert p.key == sha(raw)


@pytest.mark.parametrize("seed", range(30))
def test_mutated_messages_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(SIMPLE + b"--\n" + SIMPLE)
    for _ in range(rng.randint(1, 40)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    p = parse(bytes(data))
    assert len(p.key) == 64
    assert_storable(p)
