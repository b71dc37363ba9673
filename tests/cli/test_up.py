"""`crewguard up`: crew daemon and supervisor as two processes, stopped together by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from crewguard.settings import PACKAGED_CONFIG_DIR

#: Upper bound for the whole scenario; the test fails (not hangs) past it.
DEADLINE_S = 90


def _status(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "crewguard.cli", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_up_runs_crew_and_supervisor_and_stops_on_sigterm(tmp_path: Path) -> None:
    for name in ("agents.yaml", "tasks.yaml"):
        (tmp_path / name).write_text((PACKAGED_CONFIG_DIR / name).read_text())
    config = tmp_path / "crewguard.yaml"
    config.write_text((PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREWGUARD_")}
    env |= {
        "CREWGUARD_CONFIG": str(config),
        "CREWGUARD_DATA_DIR": str(tmp_path / "data"),
        "CREWGUARD_WORKERS__HANDLER": "echo",
        "CREWGUARD_WORKERS__PRELOAD": '["crewguard.crew.ledger.jobs"]',
    }
    mails = []
    for i in range(3):
        path = tmp_path / f"m{i}.eml"
        path.write_bytes(
            f"From: a{i}@example.com\r\nSubject: s{i}\r\nMessage-ID: <up{i}@t>\r\n\r\nhello\r\n".encode()
        )
        mails.append(str(path))
    subprocess.run(
        [sys.executable, "-m", "crewguard.cli", "intake", "add", *mails],
        env=env,
        check=True,
        capture_output=True,
    )
    up = subprocess.Popen([sys.executable, "-m", "crewguard.cli", "up"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        status = _status(env)
        while time.monotonic() < deadline:
            status = _status(env)
            if status["emails"]["ticketed"] == 3 and status.get("supervisor"):
                break
            time.sleep(0.5)
        assert status["emails"]["ticketed"] == 3
        assert status["supervisor"] is not None, "the supervisor process never beat"
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        # both children (and the fork server behind the crew daemon) are gone with it
        left: list[str] = []
        for _ in range(100):
            left = subprocess.run(["pgrep", "-s", str(up.pid)], capture_output=True, text=True).stdout.split()
            if not left:
                break
            time.sleep(0.1)
        assert left == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
