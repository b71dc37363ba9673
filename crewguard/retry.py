"""The one retry policy: capped exponential backoff with full jitter, honouring Retry-After.

Used for LLM calls, ticket creation and job re-queueing alike, so every retry in
crewguard is counted, bounded and shaped the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from crewguard.clock import SYSTEM_CLOCK, Clock

T = TypeVar("T")

#: Attempts in total (first try included) when a policy does not say otherwise.
DEFAULT_MAX_ATTEMPTS = 3
#: Backoff before the second attempt is drawn from [0, base]; it doubles per attempt.
DEFAULT_BASE_S = 1.0
#: No single backoff is longer than this.
DEFAULT_CAP_S = 30.0


class RetryableError(Exception):
    """An error worth another attempt; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_s: float = DEFAULT_BASE_S
    cap_s: float = DEFAULT_CAP_S

    def backoff(
        self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None
    ) -> float:
        """Delay after failed attempt number `attempt` (1-based): full jitter, at least Retry-After."""
        ceiling = min(self.cap_s, self.base_s * (2 ** max(0, attempt - 1)))
        delay = (rng or random).uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap_s))
        return delay


@dataclass
class Attempt:
    number: int
    error: BaseException
    delay_s: float


def call_with_retries(
    fn: Callable[[int], T],
    policy: RetryPolicy,
    *,
    retry_on: tuple[type[BaseException], ...] = (RetryableError,),
    retry_if: Callable[[BaseException], bool] | None = None,
    on_retry: Callable[[Attempt], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    rng: random.Random | None = None,
) -> T:
    """Call `fn(attempt_number)` until it returns, retrying errors in `retry_on` (and `retry_if(error)`).

    The last error is re-raised once `policy.max_attempts` attempts have failed.
    """
    attempt = 1
    while True:
        try:
            return fn(attempt)
        except retry_on as exc:
            if attempt >= policy.max_attempts or (retry_if is not None and not retry_if(exc)):
                raise
            delay = policy.backoff(attempt, rng, getattr(exc, "retry_after", None))
            if on_retry is not None:
                on_retry(Attempt(attempt, exc, delay))
            clock.sleep(delay)
            attempt += 1
