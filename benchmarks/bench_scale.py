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

PART_ROWS = 10_000
PASS_MODEL, PASS_IMAGE_SIZE = "mobilenetv3_small_050", 64  # tiny: the pass's own costs, not a model's, dominate
CASES = ("plan", "resume", "parts_plan", "parts_resume")  # table layout, then parts layout


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


def plan_with_parts(manifest: str, output: str) -> tuple[dict, tuple]:
    """The parts layout's planning and resume (:func:`cskd_ray.io.parts.plan_parts`, then the committed parts).

    The manifest is indexed by a Ray task: the driver receives the unit's row count and writes ``plan.json``.
    On a rerun the plan is reused and the commit markers are listed (names only).
    """
    from cskd_ray.io.part_pass import committed_parts
    from cskd_ray.io.parts import plan_parts
    from cskd_ray.io.sources import SourceConfig

    plan = plan_parts([SourceConfig(uri=manifest)], output, PART_ROWS)
    done = committed_parts(output)
    pending = [p for p in range(len(plan.parts)) if p not in done]
    return ({"inputs": plan.rows, "pending": sum(plan.part_rows(p) for p in pending), "known": 0},
            (plan.parts, done, pending))


def commit_all_parts(output: Path) -> None:
    """Write a commit marker for every part of ``output``'s plan (a finished run, as resume finds it)."""
    from cskd_ray.io.part_pass import marker_uri
    from cskd_ray.io.parts import load_plan

    plan = load_plan(str(output))
    for part in range(len(plan.parts)):
        uri = Path(marker_uri(str(output), part))
        uri.parent.mkdir(parents=True, exist_ok=True)
        uri.write_text(json.dumps({"part": part, "rows": plan.part_rows(part)}))


def _rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def child(manifest: str, output: str, layout: str) -> None:
    """Run the planning in this fresh process; print, as JSON, the RSS it adds and keeps, its peak, and seconds."""
    import cskd_ray.io.feature_cache  # noqa: F401 - the imports are not the planning's memory
    import cskd_ray.io.part_pass  # noqa: F401
    import cskd_ray.io.sources  # noqa: F401

    if layout == "parts":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.get(ray.remote(lambda: None).remote())  # a worker is up before the baseline
    base, base_peak = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    counts, state = (plan_with_parts if layout == "parts" else plan)(manifest, output)
    seconds = time.perf_counter() - start
    held = _rss_bytes() - base  # what the driver holds through the pass (``state`` is still referenced)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(base, base_peak)
    print(json.dumps({**counts, "rss_growth": held, "peak_growth": max(peak, held), "seconds": seconds,
                      "state_items": sum(len(x) for x in state)}))


def write_images(folder: Path, n: int) -> list[Path]:
    """``n`` distinct tiny JPEGs (16 × 16 px, random): every input is new content, so neither layout copies rows."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"{i:07d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def write_pass_model(folder: Path) -> Path:
    """A scoring model folder (tiny MobileNetV3 at 64 px + 10-bin head, random weights), as distill writes them."""
    import torch
    from safetensors.torch import save_file

    from cskd_ray.models import create_encoder
    from cskd_ray.models.heads import AestheticHead, EncoderWithHead

    torch.manual_seed(0)
    encoder = create_encoder(PASS_MODEL, image_size=PASS_IMAGE_SIZE)
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    description = {"stage": "distill", "encoder": {"name": PASS_MODEL, "pretrained": False, "projection": "linear",
                                                   "image_size": PASS_IMAGE_SIZE},
                   "head": {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0},
                   "preprocess": encoder.preprocess.to_dict()}
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def pass_child(manifest: str, output: str, layout: str) -> None:
    """One scoring pass (``score_missing``, the pass without the summary) in this fresh process, driver RSS sampled."""
    import threading

    import ray

    import cskd_ray.models.saved  # noqa: F401 - torch and timm: the driver's imports are not the pass's memory
    from cskd_ray.stages import load_config
    from cskd_ray.stages.label import score_missing

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.get(ray.remote(lambda: None).remote())
    cfg = load_config("score", None, [f"model={Path(output).parent / 'model'}", "batch_size=64",
                                      f"layout={layout}"], input_uris=[manifest], output_uri=output)
    base, peak, running = _rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = score_missing(cfg, "score", lambda line: None)
    seconds = time.perf_counter() - start
    running[0] = False
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    print(json.dumps({"rows": result.new_rows, "errors": result.errors, "seconds": seconds,
                      "rss_peak_growth": peak[0] - base}))


def measure_pass(manifest: Path, output: Path, layout: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--pass-child", str(manifest), str(output), layout],
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(manifest: Path, output: Path, layout: str = "table") -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(manifest), str(output), layout], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--pass-sizes", type=int, nargs=2, default=[10_000, 50_000],
                        help="images of the two full scoring passes per layout (0 0: skip them)")
    parser.add_argument("--pass-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=3, metavar=("MANIFEST", "OUTPUT", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.pass_child:
        pass_child(*args.pass_child)
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
            parts_output = work / f"n{n}" / "parts-output"
            results[("parts_plan", n)] = measure(manifest, parts_output, "parts")
            commit_all_parts(parts_output)
            results[("parts_resume", n)] = measure(manifest, parts_output, "parts")
            for case in CASES:
                r = results[(case, n)]
                print(f"{case} {n} rows: driver RSS +{r['rss_growth'] / 2**20:.0f} MiB held "
                      f"({r['rss_growth'] / n:.0f} B/row), peak +{r['peak_growth'] / 2**20:.0f} MiB, in "
                      f"{r['seconds']:.1f} s; pending {r['pending']}, "
                      f"known digests {r['known']}")
        if args.pass_sizes[1] > 0:
            files = write_images(work / "images", args.pass_sizes[1])
            for n in args.pass_sizes:
                folder = work / f"pass{n}"
                folder.mkdir()
                write_pass_model(folder / "model")
                manifest = folder / "manifest.csv"
                manifest.write_text("uri\n" + "".join(f"{f}\n" for f in files[:n]))
                for layout in ("table", "parts"):
                    r = results[(f"pass_{layout}", n)] = measure_pass(manifest, folder / layout, layout)
                    print(f"full pass, {layout} layout, {n} images: {r['rows'] / r['seconds']:.0f} img/s "
                          f"({r['seconds']:.1f} s), driver RSS peak +{r['rss_peak_growth'] / 2**20:.0f} MiB")
    print(load.report.line())
    # RSS is counted in pages and a parts driver holds almost nothing: ratios of two near-zero growths would be
    # noise, so growth is floored at 1 MiB (a driver that grows by under 1 MiB at both sizes reads as 1.00).
    floor = 1 << 20
    ratio = {case: max(results[(case, large)]["rss_growth"], floor) / max(results[(case, small)]["rss_growth"], floor)
             for case in CASES}
    per_row = {case: results[(case, large)]["rss_growth"] / large for case in CASES}
    sizes = f"{_label(large)}_vs_{_label(small)}"
    print(f"RESULT scale plan_rss_{sizes}={ratio['parts_plan']:.2f} resume_rss_{sizes}={ratio['parts_resume']:.2f} "
          f"table_plan_rss_{sizes}={ratio['plan']:.2f} table_resume_rss_{sizes}={ratio['resume']:.2f} "
          f"plan_bytes_per_row_{_label(large)}={per_row['parts_plan']:.1f} "
          f"table_plan_bytes_per_row_{_label(large)}={per_row['plan']:.0f} "
          f"table_resume_bytes_per_row_{_label(large)}={per_row['resume']:.0f}", end="")
    if args.pass_sizes[1] > 0:
        lo, hi = args.pass_sizes
        growth = {layout: max(results[(f"pass_{layout}", hi)]["rss_peak_growth"], floor)
                  / max(results[(f"pass_{layout}", lo)]["rss_peak_growth"], floor) for layout in ("table", "parts")}
        speed = {n: (results[("pass_parts", n)]["rows"] / results[("pass_parts", n)]["seconds"])
                 / (results[("pass_table", n)]["rows"] / results[("pass_table", n)]["seconds"]) for n in (lo, hi)}
        print(f" pass_rss_ratio={growth['parts']:.2f} table_pass_rss_ratio={growth['table']:.2f} "
              f"pass_speed_vs_old={speed[lo]:.2f} pass_speed_vs_old_{_label(hi)}={speed[hi]:.2f}", end="")
    print(f" {load.report.result_fields()}")


if __name__ == "__main__":
    main()
