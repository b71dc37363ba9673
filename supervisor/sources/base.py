"""The seam between the supervisor and where traces live: a `TraceSource` and its error."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Protocol

from crewguard.supervisor.model import ActiveRun, Observation

#: Hex characters kept from sha256 for argument and prompt keys (64 bits: collisions are not a concern).
KEY_HEX_CHARS = 16
#: Runs of digits, blanked when arguments are compared up to numbers (a counter the model keeps bumping).
_DIGITS = re.compile(r"\d+")


class SourceUnavailable(Exception):
    """The trace source could not answer this time; `retry_after` is when to ask again (seconds)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TraceSource(Protocol):
    def observations_for(self, active_runs: Mapping[str, ActiveRun]) -> dict[str, list[Observation]]:
        """Every observation known for each active run, ordered by start; raises SourceUnavailable."""
        ...


def content_key(value: Any) -> str | None:
    """A short stable hash of tool arguments or a prompt (strings are hashed as they are)."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def shape_key(value: Any) -> str | None:
    """`content_key` of tool arguments with the numbers inside their texts blanked, so `{"q": "refund #1"}`
    and `{"q": "refund #2"}` share it (near repeats); numeric arguments (`{"page": 2}`) stay distinct."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return content_key(_DIGITS.sub("0", value))
    return content_key(_blank_numbers_in_texts(value))


def _blank_numbers_in_texts(value: Any) -> Any:
    if isinstance(value, str):
        return _DIGITS.sub("0", value)
    if isinstance(value, dict):
        return {str(k): _blank_numbers_in_texts(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_blank_numbers_in_texts(v) for v in value]
    return value
