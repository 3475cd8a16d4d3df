"""
Memory and CPU of running processes, read from C{/proc}: RSS and its peak
(C{VmRSS}, C{VmHWM}), CPU seconds, a process's descendants, and a sampler
that keeps the peak RSS of some processes while something runs.
"""

from __future__ import annotations

import os
import threading


def status_kb(pid: int, field_name: str) -> int | None:
    """
    A C{kB} field of C{/proc/<pid>/status} (C{VmRSS}, C{VmHWM}), or L{None}
    if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_mib(pids: list[int]) -> float:
    """
    The summed C{VmRSS} of C{pids}, in MiB.
    """
    return sum(status_kb(pid, "VmRSS") or 0 for pid in pids) / 1024


def cpu_seconds(pid: int) -> float:
    """
    The user and system CPU seconds C{pid} has used, from C{/proc/<pid>/stat}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> bool:
    """
    Reset C{pid}'s C{VmHWM} (peak RSS) to its current RSS, as Linux allows
    by writing 5 to C{/proc/<pid>/clear_refs}; whether that worked.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """
    C{pid} and all its descendants (for gunicorn: the arbiter and its workers).
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree = [pid]
    for member in tree:
        tree.extend(child for child, parent in parents.items() if parent == member)
    return tree


class RssSampler:
    """
    Samples the summed C{VmRSS} of some processes every C{interval} seconds
    in a thread, keeping the peak.
    """

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        return sum(status_kb(pid, "VmRSS") or 0 for pid in self.pids)

    def _run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, self.sample())
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.sample())
