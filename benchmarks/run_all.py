"""``make bench``: run every speed benchmark, then print one table of each ratio, its target and whether it is met.

Each benchmark runs in its own process (its own local Ray), one after the other, with its full output
saved to ``runs/bench/<name>.log``; only its ``RESULT`` and ``machine:`` lines are echoed. A ratio measured
while other processes kept the machine busy (``comparable=0``, see ``benchmarks/machine.py``) is marked
"busy": it is not evidence either way. The quality benchmark (``bench_quality.py``) trains models for
several seeds and is run on its own; it is not part of this table.

Run: ``make bench`` or ``.venv/bin/python benchmarks/run_all.py [--only score ...]``.
"""

from __future__ import annotations

import argparse
import operator
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Target:
    """One ratio a benchmark prints on its RESULT line and the bound it should meet."""

    key: str
    compare: str  # ">=" or "<="
    bound: float
    note: str

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the bound (NaN never does)."""
        return {">=": operator.ge, "<=": operator.le}[self.compare](value, self.bound)


BENCHMARKS: dict[str, tuple[list[str], list[Target]]] = {
    "features": (["bench_features.py", "--repeats", "2", "--extra-images", "768"], [
        Target("pipeline_vs_dataloader_1k", ">=", 0.9, "features pipeline vs DataLoader loop, 1k images end to end"),
        Target("steady_vs_dataloader", ">=", 0.9, "features pipeline vs DataLoader loop, marginal img/s"),
        Target("cached_speedup", ">=", 10, "cached rerun vs first run"),
    ]),
    "align": (["bench_align.py"], [
        Target("cached_vs_online", ">=", 3, "align epoch with cached vs online CLIP targets"),
    ]),
    "ingest": (["bench_ingest.py"], [
        Target("packed_vs_originals", ">=", 2, "align ingest: packed cache rows vs reading 768 px originals"),
    ]),
    "score": (["bench_score.py", "--sizes", "1000", "4000"], [
        Target("job_vs_loop_1k", ">=", 0.7, "scoring job vs plain loop, 1k images"),
        Target("job_vs_loop_4k", ">=", 0.9, "scoring job vs plain loop, 4k images"),
        Target("steady_job_vs_loop", ">=", 0.9, "scoring job vs plain loop, marginal img/s 1k -> 4k"),
        Target("memory_4k_vs_1k", "<=", 1.3, "peak memory, 4k vs 1k images"),
        Target("student_vs_teacher", ">=", 5, "student vs ViT-B/16 teacher, marginal img/s"),
    ]),
    "scale": (["bench_scale.py"], [
        Target("plan_rss_1m_vs_100k", "<=", 1.1, "parts layout: driver RSS to plan 1M vs 100k inputs"),
        Target("resume_rss_1m_vs_100k", "<=", 1.1, "parts layout: driver RSS to resume 1M vs 100k inputs"),
        Target("pass_rss_ratio", "<=", 1.2, "parts layout: driver RSS through a full pass, 50k vs 10k images"),
        Target("pass_speed_vs_old", ">=", 0.9, "parts vs table layout rows/s, 10k images"),
        Target("pass_speed_vs_old_50k", ">=", 0.9, "parts vs table layout rows/s, 50k images"),
    ]),
}


def parse_result(line: str) -> dict[str, float]:
    """``RESULT name k=v k=v`` -> {k: float(v)}."""
    return {key: float(value) for key, value in (field.split("=", 1) for field in line.split()[2:])}


def run_benchmark(name: str, command: list[str], logs: Path) -> tuple[dict[str, float], float]:
    """Run one benchmark, save its output, echo its summary lines; its RESULT values and wall seconds."""
    log = logs / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, str(HERE / command[0]), *command[1:]], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
        result: dict[str, float] = {}
        for line in process.stdout:
            out.write(line)
            if line.startswith(("RESULT", "machine:")):
                print(f"  {name}: {line.rstrip()}", flush=True)
            if line.startswith("RESULT"):
                result = parse_result(line)
        status = process.wait()
    seconds = time.perf_counter() - start
    if status or not result:
        print(f"  {name}: FAILED (exit {status}, no RESULT line); see {log}", flush=True)
    return result, seconds


def table(results: dict[str, dict[str, float]]) -> list[str]:
    """The final table's lines: benchmark, ratio, value, target, verdict."""
    lines = [f"{'benchmark':<10} {'ratio':<24} {'value':>9}  {'target':<8} verdict", "-" * 66]
    for name, (_, targets) in BENCHMARKS.items():
        if name not in results:
            continue
        values = results[name]
        busy = values.get("comparable", 1.0) == 0
        for target in targets:
            value = values.get(target.key)
            if value is None:
                verdict, shown = "missing", "-"
            else:
                verdict = ("met" if target.met(value) else "NOT met") + (" (busy)" if busy else "")
                shown = f"{value:.3f}"
            lines.append(f"{name:<10} {target.key:<24} {shown:>9}  {target.compare} {target.bound:<5} {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these benchmarks only")
    args = parser.parse_args()
    logs = HERE.parent / "runs" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.perf_counter()
    for name, (command, _) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"bench {name}: running (log {logs / name}.log)", flush=True)
        results[name], seconds = run_benchmark(name, command, logs)
        print(f"  {name}: {seconds:.0f} s", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - started:.0f} s")
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
