"""The email as the agents see it, and how it is put into a prompt as untrusted data."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Body characters put into a prompt; the rest is cut (long threads, pasted logs, attachments as text).
MAX_BODY_CHARS = 4000
#: Sender and subject are single short lines in the prompt.
MAX_HEADER_CHARS = 300
#: The lines that fence the email in the task description (config/tasks.yaml).
EMAIL_START = "--- EMAIL START ---"
EMAIL_END = "--- EMAIL END ---"
#: What a forged delimiter line inside the email is replaced with.
NEUTRALIZED_DELIMITER = "[delimiter line removed]"

# Any line that looks like one of our fences (dashes, spacing and case varied) is a forgery attempt.
_DELIMITER_LINE = re.compile(
    r"^[ \t>]*-{2,}[ \t]*EMAIL[ \t_-]*(START|END|BEGIN)[ \t]*-{2,}[ \t]*$", re.I | re.M
)
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c\x85]+")


@dataclass(frozen=True)
class EmailForTriage:
    """What the classifiers need of an email; every field is untrusted.

    key: the email key (sha256 hex, see DESIGN.md decision 6)
    sender: the From address as received
    subject: the Subject header, decoded
    body: the text body, decoded
    """

    key: str
    sender: str
    subject: str
    body: str


def _one_line(text: str) -> str:
    return neutralize_delimiters(_LINE_BREAKS.sub(" ", text)).strip()[:MAX_HEADER_CHARS]


def neutralize_delimiters(text: str) -> str:
    """Replace every line that imitates an EMAIL START/END fence."""
    return _DELIMITER_LINE.sub(NEUTRALIZED_DELIMITER, text)


def render_for_prompt(email: EmailForTriage, max_body_chars: int = MAX_BODY_CHARS) -> str:
    """`From: ...\\nSubject: ...\\n\\n<body>`: headers on one line each, body capped, fences neutralized."""
    body = email.body.replace("\r\n", "\n").replace("\r", "\n")
    if len(body) > max_body_chars:
        body = body[:max_body_chars] + "\n[... truncated]"
    body = neutralize_delimiters(body)
    return f"From: {_one_line(email.sender)}\nSubject: {_one_line(email.subject)}\n\n{body}"
