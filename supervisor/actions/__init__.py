"""Actions: incidents (dedupe, pages, escalation, resolution) and kills."""

from crewguard.supervisor.actions.incidents import Incident, open_incident, record_findings
from crewguard.supervisor.actions.kill import KillOutcome, kill

__all__ = ["Incident", "KillOutcome", "kill", "open_incident", "record_findings"]
