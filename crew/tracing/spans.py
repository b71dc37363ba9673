"""What a span is (LLM, TOOL, AGENT, CHAIN or one of our FLOW steps) and the attributes the
local feed stores for it: the contract the supervisor reads.

Contract (JSON in `trace_events.attributes`):
- LLM start: {"model", "prompt_sha"}            LLM end: {"model", "prompt_tokens", "completion_tokens",
                                                          "total_tokens", "prompt_sha", "error"?}
- TOOL start: {"tool", "args"}                  TOOL end: {"tool", "args", "error"?}
- AGENT / CHAIN: {"error"?} on end.
- FLOW (our steps): {"step", "attempt"?, "delay_s"?, "classifier"?, "error"?, ...}

OpenInference (event-listener mode, crewai 1.15) sets the model, the prompt messages and the
tool arguments when the span STARTS (verified), so in-flight calls are identifiable by their start
row; the end row repeats `args` / `prompt_sha` so either row alone is enough.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from crewguard.crew.tracing.masking import mask_text, mask_value, redacted

KIND_LLM = "LLM"
KIND_TOOL = "TOOL"
KIND_AGENT = "AGENT"
KIND_CHAIN = "CHAIN"
KIND_FLOW = "FLOW"
FEED_KINDS = (KIND_LLM, KIND_TOOL, KIND_AGENT, KIND_CHAIN, KIND_FLOW)

#: Our tracer's instrumentation scope: flow steps, events and the run's root span.
FLOW_SCOPE = "crewguard"
#: Marks our own spans, so kind detection never depends on the scope alone.
ATTR_FLOW_KIND = "crewguard.kind"
#: Flow-step fields travel as Langfuse observation metadata (one JSON-encoded attribute per key).
ATTR_METADATA_PREFIX = "langfuse.observation.metadata."
ATTR_OBSERVATION_TYPE = "langfuse.observation.type"
ATTR_LEVEL = "langfuse.observation.level"
ATTR_STATUS_MESSAGE = "langfuse.observation.status_message"

OI_SPAN_KIND = "openinference.span.kind"
OI_MODEL = "llm.model_name"
OI_INPUT = "input.value"
OI_TOOL_NAME = "tool.name"
OI_PROMPT_TOKENS = "llm.token_count.prompt"
OI_COMPLETION_TOKENS = "llm.token_count.completion"
OI_TOTAL_TOKENS = "llm.token_count.total"

#: Longest error text stored in a feed row.
ERROR_TEXT_CHARS = 300

_WS = re.compile(r"\s+")


def span_kind(attributes: Mapping[str, Any]) -> str | None:
    """The feed kind of a span, or None for spans the feed does not record."""
    if attributes.get(ATTR_FLOW_KIND) == KIND_FLOW:
        return KIND_FLOW
    kind = attributes.get(OI_SPAN_KIND)
    return kind if kind in (KIND_LLM, KIND_TOOL, KIND_AGENT, KIND_CHAIN) else None


def _collapse(value: Any) -> Any:
    if isinstance(value, str):
        return _WS.sub(" ", value).strip()
    if isinstance(value, dict):
        return {str(k): _collapse(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_collapse(v) for v in value]
    return value


def normalize_json_text(text: str) -> str:
    """Canonical text of a JSON value (sorted keys, no spaces, whitespace collapsed inside strings);
    non-JSON text is only whitespace-collapsed. Equal calls give equal text."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return _collapse(text)
    return json.dumps(_collapse(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompt_sha(input_value: str) -> str:
    """sha256 hex of the normalized prompt messages."""
    return hashlib.sha256(normalize_json_text(input_value).encode("utf-8")).hexdigest()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _metadata(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in attributes.items():
        if key.startswith(ATTR_METADATA_PREFIX):
            try:
                out[key[len(ATTR_METADATA_PREFIX) :]] = json.loads(raw)
            except (TypeError, ValueError):
                out[key[len(ATTR_METADATA_PREFIX) :]] = raw
    return out


def _args(attributes: Mapping[str, Any], mode: str) -> str | None:
    raw = attributes.get(OI_INPUT)
    if not isinstance(raw, str):
        return None
    args = normalize_json_text(raw)
    return redacted(args) if mode == "bodies" else mask_text(args, mode)


def start_attributes(kind: str, attributes: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Contract attributes of a span's start row (masked per `mode`)."""
    if kind == KIND_LLM:
        out: dict[str, Any] = {"model": attributes.get(OI_MODEL)}
        if isinstance(attributes.get(OI_INPUT), str):
            out["prompt_sha"] = prompt_sha(attributes[OI_INPUT])
        return out
    if kind == KIND_TOOL:
        return {"tool": attributes.get(OI_TOOL_NAME), "args": _args(attributes, mode)}
    if kind == KIND_FLOW:
        return mask_value(_metadata(attributes), mode)
    return {}


def end_attributes(
    kind: str, attributes: Mapping[str, Any], mode: str, *, error: str | None
) -> dict[str, Any]:
    """Contract attributes of a span's end row; `error` is the span's error status text, if any."""
    out = start_attributes(kind, attributes, mode)
    if kind == KIND_LLM:
        prompt = _int(attributes.get(OI_PROMPT_TOKENS))
        completion = _int(attributes.get(OI_COMPLETION_TOKENS))
        out.update(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=_int(attributes.get(OI_TOTAL_TOKENS)) or prompt + completion,
        )
    if error is not None:
        out["error"] = mask_text(error[:ERROR_TEXT_CHARS], mode)
    return out


def flow_attributes(step: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """OTel attributes of one of our flow-step spans: marked FLOW, fields as Langfuse metadata."""
    attrs: dict[str, Any] = {ATTR_FLOW_KIND: KIND_FLOW}
    for key, value in {"step": step, **fields}.items():
        if value is not None:
            attrs[ATTR_METADATA_PREFIX + key] = json.dumps(value, default=str)
    return attrs
