"""Process groups: make a child its own group leader, tie it to its parent, and kill a group for sure."""

from __future__ import annotations

import ctypes
import os
import signal
from multiprocessing import forkserver

from crewguard.clock import SYSTEM_CLOCK, Clock

#: prctl option that delivers a signal to us when our parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: How often a killer checks whether the group is gone.
KILL_POLL_S = 0.05


def become_group_leader_tied_to_parent() -> None:
    """Own process group (so one killpg ends the job and its subprocesses) + die with the parent.

    The parent is the fork server, which itself exits when the daemon dies.
    """
    parent_pid = os.getppid()
    _release_fork_server()
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


def _release_fork_server() -> None:
    """Close our copy of the fork server's "alive" pipe (multiprocessing hands one to every child).

    The fork server exits when every write end of that pipe is closed; while a job child holds
    one, a SIGKILLed daemon leaves the server, and so the child, alive for ever.
    """
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass  # not inherited (not started by a fork server)
        server._forkserver_alive_fd = None


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


def kill_group(pgid: int, grace_s: float, *, clock: Clock = SYSTEM_CLOCK) -> list[str]:
    """SIGTERM the group, SIGKILL it if it is still there after `grace_s`; returns the signals sent.

    Job children are forked by the fork server, which reaps them, so a dead group disappears.
    """
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to kill process group {pgid}")
    sent: list[str] = []
    if not signal_group(pgid, signal.SIGTERM):
        return sent
    sent.append("SIGTERM")
    deadline = clock.now() + grace_s
    while clock.now() < deadline:
        if not group_alive(pgid):
            return sent
        clock.sleep(KILL_POLL_S)
    if signal_group(pgid, signal.SIGKILL):
        sent.append("SIGKILL")
        for _ in range(100):  # SIGKILL is not instant: wait until the group is really gone
            if not group_alive(pgid):
                break
            clock.sleep(KILL_POLL_S)
    return sent
