"""What the benches share: how busy the machine was, and running at a higher priority.

On a small shared machine other work skews timings; every bench reports how much CPU
other processes took during its run, and can renice itself (``--nice -10``).
"""

from __future__ import annotations

import os
import resource
import time


def cpu_of(pid: int) -> float:
    """utime + stime of a live process, seconds (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class MachineLoad:
    """CPU that *other* processes used while a bench ran (it skews timings on a small machine).

    System-wide busy time from /proc/stat minus this process's, its reaped children's, and
    the live processes of ``pids`` (servers, workers, engines the bench started) CPU.
    """

    pids: tuple[int, ...] = ()

    def __enter__(self) -> MachineLoad:  # noqa: PYI034 - Self needs 3.11
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.t0
        other = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0))
        self.other_s, self.wall_s = other, wall
        self.other_pct = 100 * other / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _own(self) -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime + sum(cpu_of(p) for p in self.pids)

    def note(self) -> str:
        warn = "  !! the machine was busy with other work: timings are skewed" if self.other_pct > 10 else ""
        return f"other processes used {self.other_pct:.0f}% of the machine's CPU during the run{warn}"


def set_nice(nice: int) -> None:
    """Nice this process (children inherit it) and, where the kernel groups by session
    (``sched_autogroup``, where a process nice only counts inside its group), its autogroup."""
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    group = ""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
        with open("/proc/self/autogroup") as f:
            group = f", {f.read().strip()}"
    except OSError:
        pass
    print(f"(running at nice {os.getpriority(os.PRIO_PROCESS, 0)}{group})", flush=True)


quiet_budget = [0.0]  # seconds of waiting left for the whole bench


def add_machine_options(ap) -> None:
    """``--nice`` and ``--quiet-wait``, the same for every bench."""
    ap.add_argument("--nice", type=int, default=0,
                    help="run the bench and the processes it starts at this nice value (e.g. -10, as root), its "
                         "scheduler autogroup too, so other work on a shared machine disturbs it less")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds, over the whole bench, to wait for other processes to leave the CPU idle "
                         "before each run (shared machines); 0: never wait")


def bench_args(doc: str, rounds: int):
    """The parsed command line of a bench that takes only ``--rounds`` and the machine options
    (applied already): its description is the first line of ``doc``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    add_machine_options(parser)
    args = parser.parse_args()
    apply_machine_options(args)
    return args


def apply_machine_options(args) -> None:
    quiet_budget[0] = args.quiet_wait
    if args.nice:
        set_nice(args.nice)


def wait_for_quiet(busy_pct: float = 15.0) -> None:
    """On a shared machine, wait for a second in which others use < busy_pct of the CPU.

    All waits together are bounded by ``--quiet-wait`` seconds per bench, so a bench
    always ends in bounded time; a run that starts on a busy machine says so.
    """
    start = time.monotonic()
    deadline = start + quiet_budget[0]
    waited = False
    while True:
        b0 = MachineLoad._busy()
        time.sleep(1.0)  # sampling /proc/stat over one second: there is nothing to wait on instead
        pct = 100 * (MachineLoad._busy() - b0) / (os.cpu_count() or 1)
        quiet_budget[0] = max(0.0, quiet_budget[0] - (time.monotonic() - start))
        start = time.monotonic()
        if pct < busy_pct:
            if waited:
                print("  (machine quiet now)", flush=True)
            return
        if time.monotonic() > deadline:
            print(f"  (machine still {pct:.0f}% busy; the --quiet-wait budget is spent: running anyway)", flush=True)
            return
        if not waited:
            print(f"  (machine {pct:.0f}% busy with other work: waiting up to {quiet_budget[0]:.0f} s for it "
                  "to calm)", flush=True)
            waited = True


# --- the two contenders ----------------------------------------------------------------
