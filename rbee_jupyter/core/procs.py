"""Whether a process id still names a running process.

Shared by discovery (is the server of ``JPY_PARENT_PID`` alive?), the GGUF importer (is the
import that left this temporary folder still running?) and the tests (is the worker gone?
wait until the processes a hub started have exited).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone.

    A process of another user is alive (``kill`` answers EPERM). Without ``/proc`` (macOS)
    the zombie check is skipped.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, not ours
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # reaped in between, or no /proc at all
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # the name, in parentheses, may hold spaces


def wait_exited(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait, at most ``timeout`` seconds, until every process of ``pids`` has exited; returns those still running.

    Works for processes that are not our children (a hub's servers, their kernels), which
    ``waitpid`` cannot wait for: on Linux a pidfd per process becomes readable the moment it
    exits, so this sleeps until then instead of polling on a guess of how long an exit takes
    (which a busy machine overruns). Without pidfds (macOS, old kernels) it checks
    :func:`pid_alive` every 50 ms.
    """
    deadline = time.monotonic() + timeout
    waiting: dict[int, int | None] = {}
    for pid in set(pids):
        try:
            waiting[pid] = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        except ProcessLookupError:
            continue
        except OSError:  # no pidfd for it (permissions, old kernel): checked by polling
            waiting[pid] = None
    try:
        while True:
            for pid in [p for p in waiting if not pid_alive(p)]:
                fd = waiting.pop(pid)
                if fd is not None:
                    os.close(fd)
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return set(waiting)
            fds = [fd for fd in waiting.values() if fd is not None]
            if fds and len(fds) == len(waiting):
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                ready = {fd for fd, _ in poller.poll(left * 1000)}  # wakes when one of them exits
                if any(fd in ready and pid_alive(pid) for pid, fd in waiting.items()):
                    time.sleep(min(0.05, left))  # exited but still shown as running: do not spin
            else:
                time.sleep(min(0.05, left))
    finally:
        for fd in waiting.values():
            if fd is not None:
                os.close(fd)
