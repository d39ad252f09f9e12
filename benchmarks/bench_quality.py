"""Label-scarce quality proxy: a student trained on the labels alone vs the CSKD student, over several seeds.

Data: generated demo images (``cskd_ray.data.demo``: photo-like scenes whose hidden score depends on
exposure, contrast, colourfulness, sharpness, composition and noise), ``--num-images`` of them with
``--labeled-fraction`` labeled (AVA vote histograms; 30% of the labeled ones form the test split), the
rest unlabeled. The pipeline is the real one (Ray Data + Ray Train, the same code as ``cskd-ray``):

1. features: tiny random-initialised CLIP (``cskd-tiny-vit``) over every image (once);
2. align: teacher encoder ``--teacher-encoder`` and student encoder ``--student-encoder`` (once each);
3. for each seed (the training seed: initialisation of heads and shuffling; the data stay the same):
   teacher on the labels → pseudo-labels of the unlabeled images → CSKD student (labels + pseudo-labels
   + CLIP features) and, as the baseline, the same student with ``kd_weight=0, feat_weight=0`` (labels only,
   the same number of epochs).

Both students are scored by the test-split SRCC of their best checkpoint (the stage's own model
selection, the same for both arms). Honest caveat: CLIP here is random (no weights can be downloaded), so
the feature term carries no pretrained knowledge; what is measured is what the teacher's pseudo-labels
add. Last line:
``RESULT quality labels_only_srcc=<mean> cskd_srcc=<mean> cskd_minus_labels_only=<mean diff> cskd_losses=<n>``.

Run: ``.venv/bin/python benchmarks/bench_quality.py [--num-images 4000] [--seeds 0 1 2] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from cskd_ray.data.demo import make_demo_data
from cskd_ray.runtime import init_ray
from cskd_ray.stage_runs import run_align_command, run_features_command, run_label_command, run_supervised_command

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--labeled-fraction", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="runs/bench_quality")
    parser.add_argument("--teacher-encoder", default="test_vit3")
    parser.add_argument("--student-encoder", default="test_vit")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--student-epochs", type=int, default=3, help="CSKD epochs over labeled + unlabeled rows")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start, work = time.perf_counter(), Path(args.workdir).resolve()
    data = work / "data"
    if not (data / "AVA.txt").exists():
        make_demo_data(data, args.num_images, args.labeled_fraction, seed=0, image_size=64, workers=2)
    init_ray()
    features = str(work / "features")
    run_features_command(str(CONFIGS / "features.yaml"), ["batch_size=128"], [str(data / "images")], features)
    aligned = {}
    for role, encoder in (("teacher", args.teacher_encoder), ("student", args.student_encoder)):
        folder = work / f"align-{role}"
        if not (folder / "model" / "model.json").exists():
            run_align_command(str(CONFIGS / "align.yaml"), [f"encoder.name={encoder}", "train.batch_size=64",
                                                            "train.epochs=1"], [features], str(folder))
        aligned[role] = str(folder / "model")
    labels = [f"labels.images_root={data / 'images'}", f"labels.test_list={data / 'test.jpgl'}"]
    rows = []
    for seed in args.seeds:
        run = work / f"seed{seed}"
        common = [*labels, f"train.seed={seed}", "train.batch_size=32", "train.warmup_steps=5"]
        teacher = run_supervised_command("teacher", str(CONFIGS / "teacher.yaml"),
                                         [*common, f"aligned={aligned['teacher']}",
                                          f"train.epochs={args.teacher_epochs}"],
                                         [str(data / "AVA.txt")], str(run / "teacher"))
        run_label_command(str(CONFIGS / "label.yaml"), [f"model={run / 'teacher' / 'model'}", "batch_size=128"],
                          [str(data / "unlabeled.csv")], str(run / "pseudo-labels"))
        student_args = [*common, f"aligned={aligned['student']}", f"pseudo_labels={run / 'pseudo-labels'}",
                        f"features={features}"]
        cskd = run_supervised_command("distill", str(CONFIGS / "distill.yaml"),
                                      [*student_args, f"train.epochs={args.student_epochs}"],
                                      [str(data / "AVA.txt")], str(run / "student-cskd"))
        # the baseline sees only the labeled rows: give it the teacher's epochs so it gets enough steps
        baseline = run_supervised_command("distill", str(CONFIGS / "distill.yaml"),
                                          [*student_args, "kd_weight=0", "feat_weight=0",
                                           f"train.epochs={args.teacher_epochs}"],
                                          [str(data / "AVA.txt")], str(run / "student-labels-only"))
        rows.append({"seed": seed, "teacher_srcc": teacher["metrics"]["val_srcc"],
                     "labels_only_srcc": baseline["metrics"]["val_srcc"], "cskd_srcc": cskd["metrics"]["val_srcc"],
                     "labels_only_steps": baseline["steps"], "cskd_steps": cskd["steps"]})
        print(json.dumps(rows[-1]), flush=True)
    labels_only = statistics.mean(r["labels_only_srcc"] for r in rows)
    cskd_mean = statistics.mean(r["cskd_srcc"] for r in rows)
    losses = sum(r["cskd_srcc"] <= r["labels_only_srcc"] for r in rows)
    print(f"{'seed':>5}{'teacher':>10}{'labels only':>14}{'CSKD':>8}")
    for r in rows:
        print(f"{r['seed']:>5}{r['teacher_srcc']:>10.3f}{r['labels_only_srcc']:>14.3f}{r['cskd_srcc']:>8.3f}")
    print(f"bench_quality: {args.num_images} images, {args.labeled_fraction:.0%} labeled, seeds {args.seeds}, "
          f"{time.perf_counter() - start:.0f} s")
    print(f"RESULT quality labels_only_srcc={labels_only:.4f} cskd_srcc={cskd_mean:.4f} "
          f"cskd_minus_labels_only={cskd_mean - labels_only:.4f} cskd_losses={losses}")


if __name__ == "__main__":
    main()
