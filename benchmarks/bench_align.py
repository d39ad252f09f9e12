"""Benchmark of phase 1: alignment training with cached CLIP features vs computing CLIP online.

Student ``mobilenetv3_small_100`` + projection (the real :class:`cskd_ray.train.align.AlignTask`), CLIP
``ViT-B-32`` (random weights, same compute as the real one), 224 px, batch 32, AdamW, on this machine's
CPU. Both variants run the same training steps on the same decoded image batches; the only difference is
where the CLIP targets come from: (a) the feature cache (a tensor already in the batch), (b) a CLIP
forward pass per batch (what a pipeline without the cache does every epoch). Image decoding is left out
of both: it is the same work in both cases.

Target: (b) / (a) epoch time >= 3. Last line: ``RESULT align cached_vs_online=<x>``.
Run: ``.venv/bin/python benchmarks/bench_align.py [--batches 6] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from machine import MachineLoad

from cskd_ray.io.transforms import normalize_batch
from cskd_ray.models import create_clip
from cskd_ray.stages import load_config
from cskd_ray.train.align import AlignTask


def epoch_seconds(task: AlignTask, batches: list[dict], clip: torch.nn.Module | None, clip_spec) -> float:
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-3)
    start = time.perf_counter()
    for batch in batches:
        if clip is not None:
            with torch.inference_mode():
                target = clip(normalize_batch(batch["pixels"], clip_spec)).clone()
            batch = {**batch, "target": target}
        loss = task(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    clip = create_clip("ViT-B-32", None, seed=0)
    stage = load_config("align", None, ["encoder.name=mobilenetv3_small_100"], input_uris=["unused"],
                        output_uri="unused").model_dump()
    task = AlignTask(stage, clip_dim=clip.dim)
    rng = np.random.default_rng(0)
    batches = [{"pixels": torch.from_numpy(rng.integers(0, 255, (args.batch_size, 224, 224, 3), dtype=np.uint8)),
                "target": torch.randn(args.batch_size, clip.dim), "valid": torch.ones(args.batch_size)}
               for _ in range(args.batches)]
    epoch_seconds(task, batches[:1], None, clip.preprocess)  # warm-up
    cached, online = [], []
    with MachineLoad() as load:
        for repeat in range(args.repeats):
            cached.append(epoch_seconds(task, batches, None, clip.preprocess))
            online.append(epoch_seconds(task, batches, clip.model, clip.preprocess))
            print(f"  repeat {repeat}: cached {cached[-1]:.2f} s, online CLIP {online[-1]:.2f} s per epoch of "
                  f"{args.batches * args.batch_size} images")
    a, b = statistics.median(cached), statistics.median(online)
    images = args.batches * args.batch_size
    print(f"medians: cached {images / a:.1f} img/s, online {images / b:.1f} img/s "
          f"(student mobilenetv3_small_100, CLIP ViT-B-32 RANDOM weights, {os.cpu_count()} cores)")
    print(load.report.line())
    print(f"RESULT align cached_vs_online={b / a:.2f} {load.report.result_fields()}")


if __name__ == "__main__":
    main()
