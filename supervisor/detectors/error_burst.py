"""Error bursts: many failed runs or failed LLM calls in a window, or a low success rate -> page."""

from __future__ import annotations

from crewguard.settings import ErrorBurstDetector as ErrorSettings
from crewguard.supervisor.model import Finding, Snapshot

#: Run outcomes that count as failures (a kill is already its own incident).
FAILED_OUTCOMES = frozenset({"error", "lost"})
#: Run outcomes that count as successes (review of an unclassifiable email is a correct outcome).
SUCCESS_OUTCOMES = frozenset({"ticketed", "review"})


class ErrorBurstDetector:
    def __init__(self, cfg: ErrorSettings) -> None:
        self.cfg = cfg

    def detect(self, snapshot: Snapshot) -> list[Finding]:
        since = snapshot.now - self.cfg.window_s
        finished = [outcome for ended_at, outcome in snapshot.finished if ended_at >= since]
        failed_runs = sum(1 for o in finished if o in FAILED_OUTCOMES)
        failed_calls = snapshot.fleet.errors_since(since)
        errors = failed_runs + failed_calls
        window = f"{self.cfg.window_s:g} s"
        evidence = {
            "failed_runs": failed_runs,
            "failed_llm_calls": failed_calls,
            "finished_runs": len(finished),
        }
        if errors >= self.cfg.min_errors:
            return [
                Finding(
                    kind="error_burst",
                    dedupe_key="error_burst:fleet",
                    summary=f"error burst: {failed_runs} failed runs and {failed_calls} failed LLM calls in {window}",
                    action="page",
                    evidence=evidence,
                )
            ]
        if len(finished) >= self.cfg.min_errors:
            rate = sum(1 for o in finished if o in SUCCESS_OUTCOMES) / len(finished)
            if rate < self.cfg.min_success_rate:
                return [
                    Finding(
                        kind="error_burst",
                        dedupe_key="error_burst:fleet",
                        summary=f"error burst: success rate {rate:.0%} over {len(finished)} runs in {window}",
                        action="page",
                        evidence={**evidence, "success_rate": round(rate, 3)},
                    )
                ]
        return []
