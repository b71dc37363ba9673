"""Hot reload of crewguard.yaml: a valid edit applies to the next email, an invalid one is refused.

Agents and tasks YAML are reloaded by the crew factory itself (per email); this covers the rest
(teams, categories, keywords, budgets, LLM endpoint ...).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crewguard.settings import ConfigError, Settings, load_settings

log = logging.getLogger("crewguard.config")


class ConfigReloader:
    """Watches one crewguard.yaml; `current()` returns the last good Settings."""

    def __init__(self, path: str | os.PathLike[str] | None, settings: Settings) -> None:
        self.path = Path(path) if path else None
        self._settings = settings
        self._stamp = self._read_stamp()
        self.last_error: str | None = None

    def _read_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> Settings:
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return self._settings
        self._stamp = stamp
        try:
            self._settings = load_settings(self.path)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("configuration edit refused; the last good configuration keeps running:\n%s", exc)
        else:
            self.last_error = None
            log.info("configuration reloaded from %s; it applies to the next email", self.path)
        return self._settings
