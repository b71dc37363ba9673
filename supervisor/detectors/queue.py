"""Queues nobody watches: review queue depth and oldest open item age, and the oldest queued job."""

from __future__ import annotations

from crewguard.settings import QueueDetector as QueueSettings
from crewguard.supervisor.model import Finding, Snapshot


class QueueDetector:
    def __init__(self, cfg: QueueSettings) -> None:
        self.cfg = cfg

    def detect(self, snapshot: Snapshot) -> list[Finding]:
        now = snapshot.now
        findings: list[Finding] = []
        if snapshot.review_open > self.cfg.max_review_depth:
            findings.append(
                Finding(
                    kind="queue_depth",
                    dedupe_key="queue_depth:review",
                    summary=f"review queue holds {snapshot.review_open} open items (max {self.cfg.max_review_depth})",
                    action="page",
                    evidence={"open": snapshot.review_open, "max": self.cfg.max_review_depth},
                )
            )
        if (
            snapshot.review_oldest_at is not None
            and now - snapshot.review_oldest_at > self.cfg.max_review_age_s
        ):
            age = now - snapshot.review_oldest_at
            findings.append(
                Finding(
                    kind="queue_age",
                    dedupe_key="queue_age:review",
                    summary=f"oldest open review item waits for {_human(age)} (max {_human(self.cfg.max_review_age_s)})",
                    action="page",
                    evidence={"age_s": round(age), "max_s": self.cfg.max_review_age_s},
                )
            )
        if (
            snapshot.queued_oldest_at is not None
            and now - snapshot.queued_oldest_at > self.cfg.max_queue_age_s
        ):
            age = now - snapshot.queued_oldest_at
            findings.append(
                Finding(
                    kind="queue_age",
                    dedupe_key="queue_age:jobs",
                    summary=f"oldest queued email waits for {_human(age)} (max {_human(self.cfg.max_queue_age_s)})",
                    action="page",
                    evidence={"age_s": round(age), "max_s": self.cfg.max_queue_age_s},
                )
            )
        return findings


def _human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
