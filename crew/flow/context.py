"""What a job's handler gets: the ledger, the configuration in force, and its claim (lease)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from crewguard.crew.ledger import jobs
from crewguard.settings import Settings


@dataclass(frozen=True)
class JobContext:
    engine: Engine
    settings: Settings
    claim: jobs.Claim
