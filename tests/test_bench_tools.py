"""The benchmark harness: RESULT parsing, the target table, and the machine-load measurement it relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from machine import MachineLoad  # noqa: E402
from run_all import parse_result, table  # noqa: E402


def test_result_lines_parse_and_table_marks_targets_and_busy_runs() -> None:
    score = parse_result("RESULT score student_vs_teacher=41.00 job_vs_loop_1k=0.340 job_vs_loop_4k=0.950 "
                         "memory_4k_vs_1k=1.093 load_other_cores=0.020 comparable=1")
    assert score["job_vs_loop_4k"] == pytest.approx(0.95) and score["comparable"] == 1
    align = parse_result("RESULT align cached_vs_online=6.71 load_other_cores=1.2 comparable=0")
    rows = {line.split()[1]: line for line in table({"score": score, "align": align})[2:]}
    assert rows["job_vs_loop_1k"].endswith("NOT met") and rows["job_vs_loop_4k"].endswith(" met")
    assert rows["memory_4k_vs_1k"].endswith(" met") and rows["student_vs_teacher"].endswith(" met")
    assert rows["cached_vs_online"].endswith("met (busy)")  # a loaded run is flagged, not trusted
    nan = parse_result("RESULT score student_vs_teacher=nan")
    assert table({"score": nan})[2].split()[1] == "job_vs_loop_1k" and "missing" in table({"score": nan})[2]
    assert any(line.endswith("NOT met") for line in table({"score": nan}))  # NaN never meets a target


def test_machine_load_counts_our_children_as_ours() -> None:
    # the child burns CPU, reports its CPU time, then stays alive for a few sampling intervals
    code = ("import time\nx = 0\nfor i in range(3_000_000): x += i\n"
            "print(time.process_time(), flush=True)\ntime.sleep(0.8)")
    with MachineLoad(interval_s=0.1) as load:
        child_cpu = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                         text=True).stdout)
    report = load.report
    assert report is not None and report.wall_s > 0 and child_cpu > 0.05
    assert report.ours_cpu_s >= 0.9 * child_cpu  # the child's CPU time is ours, not "other"
    assert report.other_cpu_s >= 0 and report.other_cores == pytest.approx(report.other_cpu_s / report.wall_s)
    assert report.result_fields().startswith("load_other_cores=") and report.line().startswith("machine: load")
