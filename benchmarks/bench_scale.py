"""Benchmark of the driver's memory as collections grow: planning and resume at N and 10·N rows (issue 13).

Today's image passes (features, label, score) plan on the driver: they expand every source into one Python list
of URIs, read the whole output table's ``uri`` and ``sha256`` columns into memory, build the set of done URIs,
the list of pending URIs and the sorted list of known digests (what :func:`cskd_ray.stages.label.score_missing`
and :func:`cskd_ray.stages.features.run` do before any image is read). This benchmark measures exactly that
code path, in a fresh interpreter per case, on a synthetic collection: a manifest of N URIs (``uri`` column,
Parquet) and, for the resume case, an output table that already holds a row for each of them (shards of 4,096
rows, as a score run writes them).

Reported per N: the RSS the planning adds and keeps while its state is alive (what the driver holds through
the whole pass), the peak above the state after imports (``ru_maxrss``), and seconds.
The target of issue 13 is a driver whose memory does not grow with N (ratio <= 1.1 from 100k to 1M); today's
driver grows linearly, which is what this benchmark shows. The full pass (>= 50k images through a tiny model,
``pass_rss_ratio`` and ``pass_speed_vs_old``) is not measured yet: it needs the parts design to compare with.

Last line: ``RESULT scale plan_rss_1m_vs_100k=<a> resume_rss_1m_vs_100k=<b> plan_bytes_per_row_1m=<c>
resume_bytes_per_row_1m=<d>``.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--sizes 100000 1000000]`` (about a minute and 1.5 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_collection(folder: Path, n: int, with_output: bool) -> tuple[Path, Path]:
    """A manifest of ``n`` URIs and (``with_output``) a score table holding a row for each."""
    folder.mkdir(parents=True, exist_ok=True)
    uris = pa.array([f"s3://bucket/images/{i // 1000:06d}/{i:09d}.jpg" for i in range(n)], pa.string())
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest)
    output = folder / "scores"
    if with_output:
        from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable

        table = ResultTable(str(output), LABEL_SCHEMA)
        rng = np.random.default_rng(0)
        for start in range(0, n, 4096):
            rows = min(4096, n - start)
            digests = [rng.bytes(32).hex() for _ in range(rows)]
            table.write_shard(pa.table({"uri": uris[start:start + rows], "sha256": digests,
                                        "score": rng.uniform(1, 10, rows), "distribution": pa.nulls(rows),
                                        "model": ["m"] * rows, "error": pa.nulls(rows, pa.string())},
                                       schema=LABEL_SCHEMA))
    return manifest, output


def plan(manifest: str, output: str) -> tuple[dict, tuple]:
    """The driver's planning, as the image passes do it today: expand sources, read the output, find pending.

    Returns the counts and the state the driver keeps for the whole pass (URIs, pending, done set, digests).
    """
    from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
    from cskd_ray.io.sources import SourceConfig, expand_sources

    uris = expand_sources([SourceConfig(uri=manifest)])
    done = ResultTable(output, LABEL_SCHEMA).read(["uri", "sha256"])
    done_uris = set(done.column("uri").to_pylist())
    pending = [u for u in uris if u not in done_uris]
    known = sorted({d for d in done.column("sha256").to_pylist() if d})
    return {"inputs": len(uris), "pending": len(pending), "known": len(known)}, (uris, done_uris, pending, known)


def _rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def child(manifest: str, output: str) -> None:
    """Run :func:`plan` in this fresh process; print, as JSON, the RSS it adds and keeps, its peak, and seconds."""
    import cskd_ray.io.feature_cache  # noqa: F401 - the imports are not the planning's memory
    import cskd_ray.io.sources  # noqa: F401

    base, base_peak = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    counts, state = plan(manifest, output)
    seconds = time.perf_counter() - start
    held = _rss_bytes() - base  # what the driver holds through the pass (``state`` is still referenced)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(base, base_peak)
    print(json.dumps({**counts, "rss_growth": held, "peak_growth": max(peak, held), "seconds": seconds,
                      "state_items": sum(len(x) for x in state)}))


def measure(manifest: Path, output: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(manifest), str(output)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--child", nargs=2, metavar=("MANIFEST", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import MachineLoad

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    small, large = args.sizes
    results: dict[tuple[str, int], dict] = {}
    with MachineLoad() as load:
        for n in (small, large):
            manifest, output = write_collection(work / f"n{n}", n, with_output=True)
            results[("plan", n)] = measure(manifest, work / f"n{n}" / "empty-output")
            results[("resume", n)] = measure(manifest, output)
            for case in ("plan", "resume"):
                r = results[(case, n)]
                print(f"{case} {n} rows: driver RSS +{r['rss_growth'] / 2**20:.0f} MiB held "
                      f"({r['rss_growth'] / n:.0f} B/row), peak +{r['peak_growth'] / 2**20:.0f} MiB, in "
                      f"{r['seconds']:.1f} s; pending {r['pending']}, "
                      f"known digests {r['known']}")
    print(load.report.line())
    ratio = {case: results[(case, large)]["rss_growth"] / max(results[(case, small)]["rss_growth"], 1)
             for case in ("plan", "resume")}
    per_row = {case: results[(case, large)]["rss_growth"] / large for case in ("plan", "resume")}
    print(f"RESULT scale plan_rss_{_label(large)}_vs_{_label(small)}={ratio['plan']:.2f} "
          f"resume_rss_{_label(large)}_vs_{_label(small)}={ratio['resume']:.2f} "
          f"plan_bytes_per_row_{_label(large)}={per_row['plan']:.0f} "
          f"resume_bytes_per_row_{_label(large)}={per_row['resume']:.0f} {load.report.result_fields()}")


if __name__ == "__main__":
    main()
