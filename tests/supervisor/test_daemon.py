"""The supervisor daemon as a real process: it scans on its APScheduler interval, beats, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import select

from crewguard.crew.ledger import db
from crewguard.crew.ledger.db import open_engine
from crewguard.crew.ledger.schema import heartbeats
from crewguard.supervisor.daemon import run_supervisor
from tests.supervisor.sv_helpers import make_settings

CHILD = """
import sys
from crewguard.settings import Settings
from crewguard.supervisor.daemon import run_supervisor
settings = Settings(data_dir=sys.argv[1], supervisor={"scan_interval_s": 0.2, "page_interval_s": 0.2})
sys.exit(run_supervisor(settings))
"""


def supervisor_beat(engine) -> float | None:
    with db.read(engine) as conn:
        return conn.execute(select(heartbeats.c.at).where(heartbeats.c.component == "supervisor")).scalar()


def test_daemon_beats_and_stops_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREWGUARD_") and k != "SLACK_BOT_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    try:
        engine = open_engine(make_settings(tmp_path).db_url)
        deadline = time.monotonic() + 60
        beats: set[float] = set()
        while len(beats) < 3 and time.monotonic() < deadline and proc.poll() is None:
            beat = supervisor_beat(engine)
            if beat is not None:
                beats.add(beat)
            time.sleep(0.1)
        assert len(beats) >= 3, proc.stderr.read().decode() if proc.poll() is not None else "no heartbeats"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_once_returns_after_one_scan(tmp_path, monkeypatch):
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    settings = make_settings(tmp_path)
    assert run_supervisor(settings, once=True) == 0
    assert supervisor_beat(open_engine(settings.db_url)) is not None
