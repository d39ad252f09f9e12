"""Label-scarce quality proxy: which part of CSKD helps, over several training seeds, with honest splits.

Data: generated demo images (``cskd_ray.io.demo``: photo-like scenes whose hidden score depends on exposure,
contrast, colourfulness, sharpness, composition and noise), ``--num-images`` of them with
``--labeled-fraction`` labeled (AVA vote histograms): 30% of the labeled ones are the test split, 25% of
the rest the validation split (``labels.val_fraction``), the others train; the unlabeled images are the
rest. CLIP is the demo's proxy (``cskd_ray.models.proxy_clip``: a tiny tower pre-trained on the generator's
latent image properties, never on scores). The pipeline is the real one, the same flow as ``cskd-ray
demo`` (:mod:`cskd_ray.app.demo`), in one Ray session:

1. once: data, the CLIP feature cache, phase 1 alignment of the teacher and student encoders;
2. per seed (the training seed: heads, shuffling; the data and the aligned encoders stay the same): the
   teacher on the labels → its pseudo-labels of the unlabeled images → the student arms:
   ``labels_only`` (not aligned, labels), ``aligned_only`` (phase 1 + labels), ``pseudo_only`` (not aligned,
   labels + pseudo-labels), ``cskd`` (phase 1 + labels + pseudo-labels + CLIP feature term); and, only when
   asked (``--arms ... multi_teacher``), ``multi_teacher``: Hou et al.'s combined teacher (arXiv 2206.00809:
   frozen classifiers pooled at several levels + an MLP head on the labels) and a student not aligned on the
   labels plus that teacher's hidden layer and predictions (no pseudo-labels);
3. at the end, once: every model on the test split (each stage selected its checkpoint on validation).

Last line: ``RESULT quality labels_only_srcc=<mean> aligned_srcc=<mean> cskd_srcc=<mean>
cskd_minus_labels_only=<mean of per-seed differences> cskd_losses=<seeds where CSKD <= labels-only>``, then
``hou_teacher_srcc=<mean> multi_teacher_srcc=<mean>`` when the ``multi_teacher`` arm ran.

Run: ``.venv/bin/python benchmarks/bench_quality.py [--num-images 800] [--seeds 0 1 2] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from cskd_ray.app.demo import ARM_NAMES, DemoPlan, arm_folder, prepare, train_arms
from cskd_ray.app.demo_eval import evaluate_on_test
from cskd_ray.app.runtime import init_ray, quiet_logs

ARMS = ("labels_only", "aligned_only", "pseudo_only", "cskd")
OPTIONAL_ARMS = ("multi_teacher",)  # not run by default: Hou et al.'s combined teacher + its student


def main() -> None:
    """Runs the benchmark and prints the per-seed table and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=DemoPlan.num_images)
    parser.add_argument("--labeled-fraction", type=float, default=DemoPlan.labeled_fraction)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="runs/bench_quality")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=(*ARMS, *OPTIONAL_ARMS))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = DemoPlan(num_images=args.num_images, labeled_fraction=args.labeled_fraction)
    start, work = time.perf_counter(), Path(args.workdir).resolve()
    if not args.verbose:
        quiet_logs()
    init_ray(quiet=not args.verbose)
    if not args.verbose:
        quiet_logs()
    shared = prepare(work, plan, print)
    data, rows = shared["data"], []
    for seed in args.seeds:
        run = work / f"seed{seed}"
        results = train_arms(work, run, shared, plan, seed, print, tuple(args.arms))
        models = {arm: str(run / arm_folder(arm) / "model") for arm in results}
        rows.append({"seed": seed, "val": {arm: r["metrics"]["val_srcc"] for arm, r in results.items()},
                     "models": models})
    for row in rows:  # the test split, once per model, after every model is trained
        row["test"] = {arm: m["srcc"] for arm, m in evaluate_on_test(row["models"], data.ava_path, data.images_dir,
                                                                     data.test_list_path).items()}
        print(json.dumps({"seed": row["seed"], "test_srcc": row["test"], "val_srcc": row["val"]}), flush=True)
    arms = ["teacher", *(["hou_teacher"] if "multi_teacher" in args.arms else []), *args.arms]
    print(f"{'seed':>5}" + "".join(f"{ARM_NAMES[a].replace('student, ', ''):>30}" for a in arms))
    for row in rows:
        print(f"{row['seed']:>5}" + "".join(f"{row['test'][a]:>30.3f}" for a in arms))
    means = {a: statistics.mean(r["test"][a] for r in rows) for a in arms}
    spread = {a: (statistics.stdev(r["test"][a] for r in rows) if len(rows) > 1 else 0.0) for a in arms}
    print(f"{'mean':>5}" + "".join(f"{means[a]:>22.3f} ± {spread[a]:.3f}" for a in arms))
    print(f"bench_quality: {args.num_images} images, {args.labeled_fraction:.0%} labeled, seeds {args.seeds}, "
          f"{time.perf_counter() - start:.0f} s")
    diffs = [r["test"]["cskd"] - r["test"]["labels_only"] for r in rows] if {"cskd", "labels_only"} <= set(arms) else []
    losses = sum(d <= 0 for d in diffs)
    print(f"RESULT quality labels_only_srcc={means.get('labels_only', float('nan')):.4f} "
          f"aligned_srcc={means.get('aligned_only', float('nan')):.4f} cskd_srcc={means.get('cskd', float('nan')):.4f} "
          f"cskd_minus_labels_only={statistics.mean(diffs) if diffs else float('nan'):.4f} cskd_losses={losses}"
          + "".join(f" {a}_srcc={means[a]:.4f}" for a in ("hou_teacher", "multi_teacher") if a in means))


if __name__ == "__main__":
    main()
