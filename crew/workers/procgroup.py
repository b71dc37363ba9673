"""Process groups: make a child its own group leader, tie it to its parent, and kill a group for sure."""

from __future__ import annotations

import ctypes
import os
import signal
import time

#: prctl option that delivers a signal to us when our parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: How often a killer checks whether the group is gone.
KILL_POLL_S = 0.05


def become_group_leader_tied_to_parent() -> None:
    """Own process group (so one killpg ends the job and its subprocesses) + die with the parent.

    The parent is the fork server, which itself exits when the daemon dies.
    """
    parent_pid = os.getppid()
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group leader
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass  # not Linux: the lease still brings the job back
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(70)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_group(pgid: int, grace_s: float) -> str:
    """SIGTERM the group, wait up to `grace_s`, then SIGKILL. Returns "terminated", "killed" or "gone".

    Job children are forked by the fork server, which reaps them, so a dead group disappears.
    """
    if not signal_group(pgid, signal.SIGTERM):
        return "gone"
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return "terminated"
        time.sleep(KILL_POLL_S)
    signal_group(pgid, signal.SIGKILL)
    for _ in range(100):
        if not group_alive(pgid):
            break
        time.sleep(KILL_POLL_S)
    return "killed"
