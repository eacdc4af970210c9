"""Whether a process id still names a running process.

Shared by discovery (is the server of ``JPY_PARENT_PID`` alive?), the GGUF importer (is the
import that left this temporary folder still running?) and the tests (is the worker gone?).
"""

from __future__ import annotations

import os
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
