"""Benchmark of the features stage: Ray Data pipeline vs a plain PyTorch DataLoader loop vs a cached rerun.

On ~256 generated images at 224 px with a ViT-B-32-sized CLIP (random weights), measured side by side in
one run (ratios, not absolute times: the machines are noisy):

  (a) the features pipeline end to end (plan + hash + decode + CLIP actors + Parquet writes; a local Ray
      is started once, before timing, as a cluster would already be running);
  (b) a plain ``DataLoader(num_workers=2)`` + model loop over the same files with the same decode and
      preprocessing code, all cores given to torch;
  (c) a rerun of (a) where everything is cached.

Targets: a/b >= 0.9 end to end on 1k images (N + M with the defaults of ``make bench``) and c/a >= 10. The last
line printed is ``RESULT features pipeline_vs_dataloader=<a/b on N> [pipeline_vs_dataloader_1k=<a/b on N + M>
steady_vs_dataloader=<marginal a/b>] cached_speedup=<c/a> load_other_cores=.. comparable=..``.

Start-up costs differ: (a) starts a new actor process (imports torch and open_clip, builds the model:
about 5 s on 2 cores) while (b) runs in the already warm process. With ``--extra-images M`` the same
comparison also runs on N + M images and prints the marginal (steady-state) ratio
``M / (t_{N+M} - t_N)`` of (a) over (b), which is what decides a long job.

Run: ``make bench`` or ``.venv/bin/python benchmarks/bench_features.py [--num-images 256] [--repeats 2]
[--extra-images 768]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import MachineLoad
from torch.utils.data import DataLoader, Dataset

from cskd_ray.app.runtime import init_ray
from cskd_ray.io.decode import decode_image
from cskd_ray.io.demo import make_demo_data
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch, resize_crop
from cskd_ray.models import create_clip
from cskd_ray.stages import load_config
from cskd_ray.stages.features import run as run_features

MODEL = "ViT-B-32"


class ImageFiles(Dataset):
    """The files decoded and preprocessed exactly as the pipeline does (bad files give zeros)."""

    def __init__(self, paths: list[Path], spec: PreprocessSpec) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        decoded = decode_image(self.paths[index].read_bytes(), draft_size=self.spec.image_size)
        if not decoded.ok:
            return np.zeros((self.spec.image_size, self.spec.image_size, 3), dtype=np.uint8)
        return resize_crop(decoded.image, self.spec)


def dataloader_images_per_s(paths: list[Path], batch_size: int) -> float:
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    clip = create_clip(MODEL, None, seed=0)
    model = clip.model.to(memory_format=torch.channels_last)
    loader = DataLoader(ImageFiles(paths, clip.preprocess), batch_size=batch_size, num_workers=2)
    count = 0
    with torch.inference_mode():
        for batch in loader:
            model(normalize_batch(batch, clip.preprocess)).numpy()
            count += len(batch)
    return count / (time.perf_counter() - start)


def pipeline_images_per_s(images: Path, output: str, batch_size: int) -> float:
    cfg = load_config("features", None, [f"batch_size={batch_size}", f"clip.name={MODEL}", "decode_batch_size=16"],
                      input_uris=[str(images)], output_uri=output)
    start = time.perf_counter()
    result = run_features(cfg, progress=lambda line: None)
    return result.inputs / (time.perf_counter() - start)


def marginal_ratio(work: Path, small: Path, num_small: int, extra: int, batch_size: int) -> tuple[float, float]:
    """Ratios (a)/(b) from runs on N and N + M images: end to end on N + M, and steady state M / (t_{N+M} - t_N)."""
    make_demo_data(work / "large", num_small + extra, labeled_fraction=0.0, image_size=224, workers=2)
    large = work / "large" / "images"
    seconds = {}
    for name, folder, count in (("small", small, num_small), ("large", large, num_small + extra)):
        paths = sorted(folder.iterdir())
        seconds[("b", name)] = count / dataloader_images_per_s(paths, batch_size)
        seconds[("a", name)] = count / pipeline_images_per_s(folder, str(work / f"marginal-{name}"), batch_size)
    rate_a = extra / (seconds[("a", "large")] - seconds[("a", "small")])
    rate_b = extra / (seconds[("b", "large")] - seconds[("b", "small")])
    end_to_end = seconds[("b", "large")] / seconds[("a", "large")]
    print(f"{num_small + extra} images end to end: (a) pipeline {seconds[('a', 'large')]:.1f} s, (b) DataLoader "
          f"{seconds[('b', 'large')]:.1f} s, pipeline_vs_dataloader={end_to_end:.3f}")
    print(f"marginal over {extra} extra images: (a) pipeline {rate_a:.1f} img/s, (b) DataLoader {rate_b:.1f} img/s, "
          f"steady-state pipeline_vs_dataloader={rate_a / rate_b:.3f}")
    return end_to_end, rate_a / rate_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; medians are compared")
    parser.add_argument("--extra-images", type=int, default=0, help="also measure the steady-state ratio")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    make_demo_data(work / "data", args.num_images, labeled_fraction=0.0, image_size=224, workers=2)
    images = work / "data" / "images"
    paths = sorted(images.iterdir())
    init_ray()
    print(f"bench_features: {len(paths)} images at 224 px, CLIP {MODEL} with RANDOM weights, {os.cpu_count()} cores")
    piped, plain, cached = [], [], []
    with MachineLoad() as load:
        for repeat in range(args.repeats):
            plain.append(dataloader_images_per_s(paths, args.batch_size))
            output = str(work / f"features-{repeat}")
            piped.append(pipeline_images_per_s(images, output, args.batch_size))
            cached.append(pipeline_images_per_s(images, output, args.batch_size))
            print(f"  repeat {repeat}: pipeline {piped[-1]:.1f} img/s, dataloader {plain[-1]:.1f} img/s, "
                  f"cached rerun {cached[-1]:.1f} img/s")
        a, b, c = statistics.median(piped), statistics.median(plain), statistics.median(cached)
        print(f"medians: (a) pipeline {a:.1f} img/s, (b) DataLoader(num_workers=2) {b:.1f} img/s, "
              f"(c) cached {c:.1f} img/s")
        larger = ""
        if args.extra_images:
            end_to_end, steady = marginal_ratio(work, images, len(paths), args.extra_images, args.batch_size)
            larger = (f"pipeline_vs_dataloader_{size_label(len(paths) + args.extra_images)}={end_to_end:.3f} "
                      f"steady_vs_dataloader={steady:.3f} ")
    print(load.report.line())
    print(f"RESULT features pipeline_vs_dataloader={a / b:.3f} {larger}cached_speedup={c / a:.1f} "
          f"{load.report.result_fields()}")


def size_label(n: int) -> str:
    """1024 -> ``1k``, 4000 -> ``4k``, 300 -> ``300``: the suffix of a ratio measured on ``n`` images."""
    return f"{round(n / 1000)}k" if n >= 1000 else str(n)


if __name__ == "__main__":
    main()
