"""Detectors: pure functions of a `Snapshot` that return `Finding`s (one module per problem)."""

from __future__ import annotations

from typing import Protocol

from crewguard.settings import Settings
from crewguard.supervisor.model import Finding, Snapshot


class Detector(Protocol):
    def detect(self, snapshot: Snapshot) -> list[Finding]: ...


def build_detectors(settings: Settings) -> list[Detector]:
    """The enabled detectors, configured from `settings.supervisor.detectors` and `settings.budgets`."""
    from crewguard.supervisor.detectors.error_burst import ErrorBurstDetector
    from crewguard.supervisor.detectors.loop import LoopDetector
    from crewguard.supervisor.detectors.queue import QueueDetector
    from crewguard.supervisor.detectors.stall import StallDetector
    from crewguard.supervisor.detectors.token_spike import TokenSpikeDetector

    cfg = settings.supervisor.detectors
    built: list[Detector] = []
    if cfg.loop.enabled:
        built.append(LoopDetector(cfg.loop, settings.budgets))
    if cfg.token_spike.enabled:
        built.append(TokenSpikeDetector(cfg.token_spike, settings.budgets, settings.tracing.prices))
    if cfg.stall.enabled:
        built.append(StallDetector(cfg.stall, settings.budgets))
    if cfg.error_burst.enabled:
        built.append(ErrorBurstDetector(cfg.error_burst))
    if cfg.queue.enabled:
        built.append(QueueDetector(cfg.queue))
    return built


__all__ = ["Detector", "build_detectors"]
