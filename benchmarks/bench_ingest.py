"""Benchmark of align's ingest: decoding training batches from packed cache rows vs reading the originals.

What one Ray Data decode task does per align batch (:func:`cskd_ray.train.ingest.decode_cached_rows`, 224 px,
batches of 32), on N photo-sized demo JPEGs (768 x 768, about 100-200 KB each), side by side in one run:

  (a) originals: every row reads its image file and decodes it (what align did before packed caches, and
      still does for a cache written with ``pack_size: 0``), every epoch;
  (b) packed: every row decodes the copy that features kept in the cache row (``pack_size`` 256 by
      default: a JPEG resized to 256 px on the short side), so no original is read.

Local files here: from object storage, (a) also pays one GET per image per epoch (tens of ms of latency
each, hidden only by more decode tasks), which (b) does not; so the ratio here is the lower bound.
Also printed: the one-time cost of packing (ms per image, paid once by the features stage) and packed
bytes / original bytes.

Last line: ``RESULT ingest packed_vs_originals=<x> pack_ms_per_image=<p> packed_bytes_ratio=<r>``.
Run: ``.venv/bin/python benchmarks/bench_ingest.py [--images 192] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from machine import MachineLoad

from cskd_ray.io.decode import decode_image
from cskd_ray.io.demo import make_demo_data
from cskd_ray.io.packing import pack_image
from cskd_ray.train.ingest import decode_cached_rows

SPEC = {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
        "resize_mode": "shortest"}


def epoch_seconds(table: pa.Table, batch_size: int = 32) -> float:
    start = time.perf_counter()
    for offset in range(0, len(table), batch_size):
        out = decode_cached_rows(table.slice(offset, batch_size), SPEC, 10**8)
        assert out["valid"].all()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pack-size", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    make_demo_data(work / "data", args.images, labeled_fraction=0.0, image_size=768, workers=2)
    files = sorted((work / "data" / "images").iterdir())
    originals = [f.read_bytes() for f in files]
    start = time.perf_counter()
    packed = [pack_image(data, decode_image(data, draft_size=args.pack_size).image, args.pack_size)
              for data in originals]
    pack_ms = 1000 * (time.perf_counter() - start) / len(files)
    features = pa.array([[0.0] * 8] * len(files), pa.large_list(pa.float16()))
    base = pa.table({"uri": [str(f) for f in files], "feature": features, "error": pa.nulls(len(files), pa.string())})
    with_images = base.append_column("image", pa.array(packed, pa.large_binary()))
    epoch_seconds(base.slice(0, 32))  # warm-up
    plain, fast = [], []
    with MachineLoad() as load:
        for repeat in range(args.repeats):
            plain.append(epoch_seconds(base))
            fast.append(epoch_seconds(with_images))
            print(f"  repeat {repeat}: originals {plain[-1]:.2f} s, packed {fast[-1]:.2f} s per epoch of "
                  f"{len(files)} images")
    a, b = statistics.median(plain), statistics.median(fast)
    ratio = sum(map(len, packed)) / sum(map(len, originals))
    print(f"medians: originals {len(files) / a:.1f} img/s, packed {len(files) / b:.1f} img/s (one decode task, "
          f"768 px JPEGs of {np.mean([len(d) for d in originals]) / 1024:.0f} KiB -> {args.pack_size} px packed copies "
          f"of {np.mean([len(d) for d in packed]) / 1024:.0f} KiB); packing once: {pack_ms:.1f} ms per image")
    print(load.report.line())
    print(f"RESULT ingest packed_vs_originals={a / b:.2f} pack_ms_per_image={pack_ms:.1f} "
          f"packed_bytes_ratio={ratio:.3f} {load.report.result_fields()}")


if __name__ == "__main__":
    main()
