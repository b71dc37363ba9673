"""PII masking of span attributes, shared by the Langfuse exporter and the local feed.

Modes (settings.tracing.mask):
- ``off``: nothing changes.
- ``contacts``: e-mail addresses and phone numbers in every string attribute become ``[email]`` / ``[phone]``.
- ``bodies``: contacts masked, and content attributes (prompts, completions, tool input/output, task text)
  are replaced by ``<removed sha256=...>``: the hash keeps identical inputs comparable (loop detection)
  without keeping the text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

MaskMode = Literal["off", "contacts", "bodies"]
MASK_MODES: tuple[str, ...] = ("off", "contacts", "bodies")

EMAIL_PLACEHOLDER = "[email]"
PHONE_PLACEHOLDER = "[phone]"

#: An e-mail address, as found in free text, JSON or headers.
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
#: A phone number: +country code and digits, or digit groups separated by space, dot, dash or parens.
PHONE_RE = re.compile(
    r"(?<!\w)(?<!\d\.)(?:\+\d{10,15}|(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,8}){1,4})"
    r"(?!\w)(?!\.\d)"
)
#: Minimum number of digits for a PHONE_RE match to count as a phone number (skips dates, versions).
PHONE_MIN_DIGITS = 10

#: Attributes holding message or tool content (OpenInference, Langfuse, OTel GenAI, CrewAI span fields).
BODY_ATTRIBUTE_PREFIXES: tuple[str, ...] = (
    "input.value",
    "output.value",
    "llm.input_messages",
    "llm.output_messages",
    "langfuse.observation.input",
    "langfuse.observation.output",
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "task_description",
    "task_expected_output",
    "crew_tasks",
    "tool.task_name",
)


def _phone_sub(match: re.Match[str]) -> str:
    text = match.group(0)
    return PHONE_PLACEHOLDER if sum(c.isdigit() for c in text) >= PHONE_MIN_DIGITS else text


def mask_contacts(text: str) -> str:
    """Replace e-mail addresses and phone numbers in `text`."""
    return PHONE_RE.sub(_phone_sub, EMAIL_RE.sub(EMAIL_PLACEHOLDER, text))


def redacted(text: str) -> str:
    """The stand-in for removed content: a short stable hash, so equal inputs stay equal."""
    return f"<removed sha256={hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()[:16]}>"


def is_body_attribute(key: str) -> bool:
    return key.startswith(BODY_ATTRIBUTE_PREFIXES)


def mask_text(text: str, mode: str, *, body: bool = False) -> str:
    """Mask one string; `body` says it is message/tool content (removed in ``bodies`` mode)."""
    if mode == "off":
        return text
    if body and mode == "bodies":
        return redacted(text)
    return mask_contacts(text)


def mask_value(value: Any, mode: str, *, body: bool = False) -> Any:
    """Mask a string, or every string inside a list/dict (JSON-like values); other values pass."""
    if isinstance(value, str):
        return mask_text(value, mode, body=body)
    if isinstance(value, Mapping):
        return {k: mask_value(v, mode, body=body) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [mask_value(v, mode, body=body) for v in value]
    return value


def attribute_patch(attributes: Mapping[str, Any], mode: str) -> tuple[dict[str, Any], list[str]]:
    """The attributes to overwrite with masked values (only those that change); nothing is deleted."""
    changed: dict[str, Any] = {}
    if mode == "off":
        return changed, []
    for key, value in attributes.items():
        body = is_body_attribute(key)
        if isinstance(value, str):
            masked: Any = mask_text(value, mode, body=body)
        elif isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
            masked = tuple(mask_text(v, mode, body=body) for v in value)
            if tuple(value) == masked:
                continue
        else:
            continue
        if masked != value:
            changed[key] = masked
    return changed, []


def langfuse_span_masker(mode: str) -> Any:
    """A `Langfuse(mask_otel_spans=...)` hook for `mode`, or None when masking is off.

    Langfuse drops the whole export batch when the hook raises, so a failing span is
    patched to a fully removed state instead of raising.
    """
    if mode == "off":
        return None
    from langfuse.types import MaskOtelSpansResult, OtelSpanPatch

    def mask_otel_spans(*, params: Any, **_: Any) -> Any:
        patches = {}
        for ident, span in params.spans.items():
            try:
                changed, deleted = attribute_patch(span.attributes, mode)
            except Exception:  # never let one odd span drop the batch
                changed, deleted = {}, [k for k, v in span.attributes.items() if isinstance(v, str)]
            if changed or deleted:
                patches[ident] = OtelSpanPatch(set_attributes=changed, delete_attributes=tuple(deleted))
        return MaskOtelSpansResult(span_patches=patches) if patches else None

    return mask_otel_spans
