"""``cskd-ray demo``: generate demo data, run the pipeline on a local Ray, print what it did.

At this stage the pipeline is: demo data → features (CLIP cache) → align (phase 1) → teacher (phase 2a,
the aligned encoder + a distribution head on the demo AVA labels) → label (phase 2b, pseudo-labels of the
unlabeled images) → distill (phase 2c, the student on labels + pseudo-labels + CLIP features), next to a
student trained on the labels alone; one table compares them on the demo test split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cskd_ray import storage

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEATURES_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo" / "features.yaml"
DEFAULT_ALIGN_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo" / "align.yaml"
DEFAULT_TEACHER_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo" / "teacher.yaml"
DEFAULT_LABEL_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo" / "label.yaml"
DEFAULT_DISTILL_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo" / "distill.yaml"


def run_demo(workdir: str = "runs/demo", num_images: int = 600, features_config: str | None = None) -> dict:
    """Generate demo data under ``workdir/data``, cache its CLIP features, write ``workdir/summary.json``."""
    from cskd_ray.data.demo import make_demo_data
    from cskd_ray.evaluation import EvaluationRequest, evaluate_model, format_table
    from cskd_ray.report import write_report
    from cskd_ray.stage_runs import (
        run_align_command,
        run_features_command,
        run_label_command,
        run_supervised_command,
    )

    start = time.perf_counter()
    data_dir = Path(workdir) / "data"
    print(f"demo: generating {num_images} demo images in {data_dir} ...", flush=True)
    data = make_demo_data(data_dir, num_images, labeled_fraction=0.25, seed=0, num_corrupt=3)
    print(f"demo: {data.num_images} images ({data.num_labeled} labeled, {data.num_test} test, "
          f"{data.num_corrupt} deliberately corrupt files)", flush=True)
    config = str(features_config or DEFAULT_FEATURES_CONFIG)
    cache = str(Path(workdir) / "features")
    features = run_features_command(config, [], [data.images_dir], cache)
    print("demo: phase 1, aligning the student encoder (timm test_vit) to the cached CLIP features ...", flush=True)
    aligned = Path(workdir) / "align-student"
    align = run_align_command(str(DEFAULT_ALIGN_CONFIG), [], [cache], str(aligned))
    print("demo: phase 2a, training the teacher on the labeled demo images ...", flush=True)
    data_dir_abs = Path(data.output).resolve()
    teacher = run_supervised_command(
        "teacher", str(DEFAULT_TEACHER_CONFIG),
        [f"aligned={aligned / 'model'}", f"labels.images_root={data_dir_abs / 'images'}",
         f"labels.test_list={data_dir_abs / 'test.jpgl'}"],
        [data.ava_path], str(Path(workdir) / "teacher"),
    )
    print("demo: phase 2b, the teacher pseudo-labels the unlabeled images ...", flush=True)
    teacher_model = str((Path(workdir) / "teacher" / "model").resolve())
    label = run_label_command(str(DEFAULT_LABEL_CONFIG), [f"model={teacher_model}"],
                              [str(data_dir_abs / "unlabeled.csv")], str(Path(workdir) / "pseudo-labels"))
    report = evaluate_model(EvaluationRequest(teacher_model, "ava", str(Path(data.ava_path).resolve()),
                                              str((Path(workdir) / "evaluate-teacher").resolve()),
                                              str(data_dir_abs / "images"), str(data_dir_abs / "test.jpgl"), "test"))
    print("demo: the teacher on the demo test split:")
    print(format_table(report))
    common = [f"aligned={aligned / 'model'}", f"labels.images_root={data_dir_abs / 'images'}",
              f"labels.test_list={data_dir_abs / 'test.jpgl'}",
              f"pseudo_labels={(Path(workdir) / 'pseudo-labels').resolve()}", f"features={Path(cache).resolve()}"]
    print("demo: phase 2c, distilling into the student (labels + pseudo-labels + CLIP features) ...", flush=True)
    student = run_supervised_command("distill", str(DEFAULT_DISTILL_CONFIG), common, [data.ava_path],
                                     str(Path(workdir) / "student"))
    print("demo: baseline, the same student on the labels alone (kd_weight=0, feat_weight=0) ...", flush=True)
    baseline = run_supervised_command("distill", str(DEFAULT_DISTILL_CONFIG),
                                      [*common, "kd_weight=0", "feat_weight=0"], [data.ava_path],
                                      str(Path(workdir) / "student-labels-only"))
    print(comparison_table({"teacher": teacher, "student (CSKD)": student, "student (labels only)": baseline}))
    stage_rates = {"features": features["images_per_s"], "align": align["images_per_s"],
                   "label": label["images_per_s"]}
    print("demo: images/s per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_rates.items()))
    summary = {"workdir": workdir, "data": data.__dict__, "features": features, "align": align, "teacher": teacher,
               "label": label, "evaluate_teacher": report, "student": student, "student_labels_only": baseline,
               "total_seconds": round(time.perf_counter() - start, 2)}
    storage.write_text_once(str(Path(workdir) / "summary.json"), json.dumps(summary, indent=2), overwrite=True)
    print(f"demo: done in {summary['total_seconds']:.1f} s; summary at {Path(workdir) / 'summary.json'}")
    print("demo: all models here are tiny and every CLIP weight is RANDOM (offline); see README 'Real CLIP weights'.")
    print(f"demo: report (metrics, training curves, galleries) at {write_report(workdir).output}")
    return summary


def comparison_table(results: dict[str, dict]) -> str:
    """Validation SRCC / PLCC / accuracy of each model (the best checkpoint's) as a text table."""
    lines = [f"{'model':<24}{'SRCC':>8}{'PLCC':>8}{'accuracy':>10}", "-" * 50]
    for name, result in results.items():
        m = result["metrics"]
        lines.append(f"{name:<24}{m['val_srcc']:>8.3f}{m['val_plcc']:>8.3f}{m['val_accuracy']:>10.3f}")
    return "\n".join(lines)
