"""Is this machine idle enough for a side-by-side ratio to mean anything? Measure it during the run.

A ratio of two timings taken in one run is only comparable with another run's when both ran on an idle
machine: other processes steal CPU from one side more than the other (Ray's tasks and actors are
separate processes, the plain loop is one). :class:`MachineLoad` records, over a benchmark run:

- the load average (1 and 5 min) when it starts and ends (``os.getloadavg``);
- the CPU time the whole machine spent busy (``/proc/stat``: user + nice + system + irq + softirq + steal);
- the CPU time of this process and all its descendants (Ray's raylet, GCS, workers, actors), sampled every
  0.25 s from ``/proc/<pid>/stat`` (utime + stime; a process that exits between two samples loses at most
  its last 0.25 s, which then counts as "other", so the error errs towards calling the machine busy).

other = busy − ours is what the rest of the machine used. The run is **comparable** when other processes
used, on average, less than ``max_other_cores`` (default 0.15) of a core over the run's wall time.

Linux only (reads /proc); elsewhere it reports ``unknown`` rather than guessing.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system (idle iowait) irq softirq steal, of the "cpu" line


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in BUSY_FIELDS) / CLOCK_TICKS


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (utime + stime) of one process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class LoadReport:
    """What :class:`MachineLoad` measured over one run."""

    wall_s: float
    load_start: tuple[float, float]
    load_end: tuple[float, float]
    ours_cpu_s: float
    other_cpu_s: float
    max_other_cores: float

    @property
    def other_cores(self) -> float:
        """Cores' worth of CPU other processes used on average during the run."""
        return self.other_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def comparable(self) -> bool:
        """True when the rest of the machine stayed under ``max_other_cores`` on average."""
        return self.other_cores < self.max_other_cores

    def line(self) -> str:
        """One human-readable line for the benchmark's output."""
        verdict = "idle: comparable" if self.comparable else "BUSY: not comparable with idle runs"
        return (f"machine: load average {self.load_start[0]:.2f}/{self.load_start[1]:.2f} (1/5 min) at start, "
                f"{self.load_end[0]:.2f}/{self.load_end[1]:.2f} at end; over {self.wall_s:.0f} s this run used "
                f"{self.ours_cpu_s:.0f} CPU-s, other processes {self.other_cpu_s:.0f} CPU-s "
                f"({self.other_cores:.2f} cores on average) -> {verdict}")

    def result_fields(self) -> str:
        """``load_other_cores=<x> comparable=<0|1>``, appended to a RESULT line."""
        return f"load_other_cores={self.other_cores:.3f} comparable={int(self.comparable)}"


class MachineLoad:
    """Context manager measuring how busy the rest of the machine is while a benchmark runs."""

    def __init__(self, max_other_cores: float = 0.15, interval_s: float = 0.25) -> None:
        self.max_other_cores, self.interval_s = max_other_cores, interval_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._running = False
        self.report: LoadReport | None = None

    def _sample(self) -> None:
        for pid in process_tree(os.getpid()):
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                self._first.setdefault(pid, 0.0)  # born during the run: all its CPU time counts
                self._last[pid] = seconds

    def _loop(self) -> None:
        while self._running:
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> MachineLoad:
        self._load_start = os.getloadavg()[:2]
        self._busy_start, self._start = machine_busy_seconds(), time.perf_counter()
        self._sample()  # processes alive now: only their CPU time from here on counts
        self._first = dict(self._last)
        self._running = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._running = False
        self._thread.join()
        wall = time.perf_counter() - self._start
        busy = machine_busy_seconds() - self._busy_start
        ours = sum(self._last[pid] - self._first.get(pid, 0.0) for pid in self._last)
        self.report = LoadReport(wall, tuple(self._load_start), tuple(os.getloadavg()[:2]), ours,
                                 max(0.0, busy - ours), self.max_other_cores)
