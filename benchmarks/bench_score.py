"""Benchmark of bulk scoring: student vs teacher, the Ray Data job vs a plain loop, memory vs collection size.

On generated demo images at 224 px, random-initialised models (same compute as trained ones), CPU fp32:

  (a) images/s of the scoring job with the student (``mobilenetv3_small_100``) vs the teacher
      (``vit_base_patch16_224``, ViT-B/16), same files, same job. Target >= 5. Reported end to end and in
      steady state (rows after the first result batch / time from the first to the last result batch,
      i.e. without the actor's start-up and model load, which a job over millions of images pays once);
      the RESULT line uses the steady-state ratio.
  (b) the scoring job end to end (listing, read + sha256 + decode tasks, model actor, Parquet writes, on a
      local Ray already running) vs a plain single-process PyTorch loop over the same files (read, the same
      decode and preprocessing code, batched forward, all cores to torch; model construction included
      on both sides), student model. Target >= 0.9.
  (c) peak memory of scoring 4N vs N images with the student (default N = 1000), both through the same
      local Ray after (b) has warmed it up (same idle workers before each run). A thread samples, every
      0.2 s, the proportional set size (PSS, from ``/proc/<pid>/smaps_rollup``) summed over this process and
      all its descendants: the raylet (which holds the object store), GCS, dashboard, the Ray Data
      read/decode workers and the model actor. PSS splits shared pages (the object store's shared memory,
      shared libraries) between the processes mapping them, so the sum is the tree's real footprint; the
      RSS sum (which counts shared pages once per process) is printed alongside. Target <= 1.3.

The last line printed is ``RESULT score student_vs_teacher=<a> job_vs_loop=<b> memory_4k_vs_1k=<c>``.

Run: ``.venv/bin/python benchmarks/bench_score.py [--teacher-images 160] [--loop-images 1000]
[--memory-images 1000]`` (Linux: reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cskd_ray.data.decode import decode_image
from cskd_ray.data.demo import make_demo_data
from cskd_ray.data.transforms import normalize_batch, resize_crop

STUDENT, TEACHER = "mobilenetv3_small_100", "vit_base_patch16_224"


def write_model(folder: Path, encoder_name: str) -> Path:
    """A scoring model folder (encoder + 10-bin distribution head, random weights) as teacher/distill write them."""
    from safetensors.torch import save_file

    from cskd_ray.models import create_encoder
    from cskd_ray.models.heads import AestheticHead, EncoderWithHead

    torch.manual_seed(0)
    encoder = create_encoder(encoder_name)
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    description = {"stage": "distill", "encoder": {"name": encoder_name, "pretrained": False, "projection": "linear"},
                   "head": {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0},
                   "preprocess": encoder.preprocess.to_dict()}
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def write_manifest(path: Path, files: list[Path]) -> Path:
    path.write_text("uri\n" + "".join(f"{f}\n" for f in files))
    return path


def score_job(model: Path, manifest: Path, output: Path) -> dict:
    """Run the scoring job (Ray already initialised) and time the arrival of result batches."""
    from cskd_ray import row_pipeline
    from cskd_ray.config import load_config
    from cskd_ray.scoring import run_score

    arrivals: list[tuple[float, int]] = []
    original = row_pipeline.ShardWriter.add

    def add(self, rows):  # noqa: ANN001, ANN202 - timing hook for this benchmark only
        arrivals.append((time.perf_counter(), len(rows)))
        return original(self, rows)

    cfg = load_config("score", None, [f"model={model}", "batch_size=32"], input_uris=[str(manifest)],
                      output_uri=str(output))
    row_pipeline.ShardWriter.add = add
    start = time.perf_counter()
    try:
        summary = run_score(cfg, progress=lambda line: None)
    finally:
        row_pipeline.ShardWriter.add = original
    seconds = time.perf_counter() - start
    arrivals = [a for a in arrivals if a[1]]
    steady = sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0]) if len(arrivals) > 2 else 0.0
    return {"images": summary["images_in"], "seconds": seconds, "end_to_end": summary["images_in"] / seconds,
            "steady": steady}


def plain_loop(model_dir: Path, files: list[Path], batch_size: int = 32) -> float:
    """Images/s of a single-process loop: read, decode, preprocess, batched forward (model load included)."""
    from cskd_ray.models.saved import load_scoring_model

    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    scorer = load_scoring_model(str(model_dir))
    size = scorer.preprocess.image_size
    batch, scores = [], []
    for i, path in enumerate(files):
        decoded = decode_image(path.read_bytes(), draft_size=size)
        if decoded.ok:
            batch.append(resize_crop(decoded.image, scorer.preprocess))
        if batch and (len(batch) == batch_size or i == len(files) - 1):
            scores.extend(scorer.predict(normalize_batch(np.stack(batch), scorer.preprocess))[0].tolist())
            batch = []
    return len(files) / (time.perf_counter() - start)


def _tree(root: int) -> list[int]:
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


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB, (0, 0) if it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0, 0
    return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])


class TreeMemory:
    """Samples, every 0.2 s, the PSS and RSS summed over this process and all its descendants (Ray's too)."""

    def __init__(self) -> None:
        self.peak_pss = self.peak_rss = 0
        self.running = False

    def sample(self) -> tuple[int, int]:
        """(PSS, RSS) of the tree now, in KiB."""
        totals = np.sum([_memory_kib(pid) for pid in _tree(os.getpid())], axis=0)
        return int(totals[0]), int(totals[1])

    def _loop(self) -> None:
        while self.running:
            pss, rss = self.sample()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(0.2)

    def __enter__(self) -> TreeMemory:
        self.base_pss = self.sample()[0]
        self.running, self.thread = True, threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-images", type=int, default=160, help="images for (a)")
    parser.add_argument("--loop-images", type=int, default=1000, help="images for (b)")
    parser.add_argument("--memory-images", type=int, default=1000, help="N for (c): N vs 4N images")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    total = max(4 * args.memory_images, args.loop_images, args.teacher_images)
    started = time.perf_counter()
    make_demo_data(work / "data", total, labeled_fraction=0.0, image_size=224, workers=2)
    files = sorted((work / "data" / "images").iterdir())
    student, teacher = write_model(work / "student", STUDENT), write_model(work / "teacher", TEACHER)
    print(f"bench_score: {len(files)} demo images at 224 px generated in {time.perf_counter() - started:.0f} s; "
          f"student {STUDENT}, teacher {TEACHER}, random weights, {os.cpu_count()} cores, CPU fp32")

    from cskd_ray.runtime import init_ray

    init_ray()
    loop_files = files[:args.loop_images]
    loop_manifest = write_manifest(work / "loop.csv", loop_files)
    job_b = score_job(student, loop_manifest, work / "loop-job")
    loop = plain_loop(student, loop_files)
    print(f"(b) {len(loop_files)} images: job {job_b['end_to_end']:.1f} img/s end to end "
          f"({job_b['steady']:.1f} steady), plain loop {loop:.1f} img/s")

    memory = {}
    for n in (args.memory_images, 4 * args.memory_images):
        manifest = write_manifest(work / f"memory-{n}.csv", files[:n])
        with TreeMemory() as tree:
            timing = score_job(student, manifest, work / f"memory-out-{n}")
        memory[n] = tree.peak_pss
        print(f"(c) {n} images: peak PSS of the process tree {tree.peak_pss / 1024:.0f} MiB (before the run "
              f"{tree.base_pss / 1024:.0f} MiB; peak RSS sum {tree.peak_rss / 1024:.0f} MiB); job "
              f"{timing['end_to_end']:.1f} img/s end to end")

    a_manifest = write_manifest(work / "a.csv", files[:args.teacher_images])
    a_student = score_job(student, a_manifest, work / "a-student")
    a_teacher = score_job(teacher, a_manifest, work / "a-teacher")
    ratio = a_student["end_to_end"] / a_teacher["end_to_end"]
    print(f"(a) {args.teacher_images} images: student {a_student['end_to_end']:.1f} img/s end to end "
          f"({a_student['steady']:.1f} steady), teacher {a_teacher['end_to_end']:.1f} img/s end to end "
          f"({a_teacher['steady']:.1f} steady); end-to-end ratio {ratio:.2f}")

    a = a_student["steady"] / a_teacher["steady"]
    b = job_b["end_to_end"] / loop
    c = memory[4 * args.memory_images] / memory[args.memory_images]
    print(f"RESULT score student_vs_teacher={a:.2f} job_vs_loop={b:.3f} memory_4k_vs_1k={c:.3f}")


if __name__ == "__main__":
    main()
