"""``cskd-ray demo``: generate demo data, run the whole method on one local Ray, print what it shows.

Stages, all in one Ray session: demo data (train / validation / test splits) → features (the demo's proxy
CLIP: :mod:`cskd_ray.models.proxy_clip`) → align (phase 1: a larger teacher encoder and the student
encoder, each to the cached CLIP features) → teacher (phase 2a) → label (phase 2b) → three students
(phase 2c): the full CSKD student, the same aligned student on the labels alone, and the same student not
aligned on the labels alone. Every stage selects its checkpoint on the validation split; the test split is
read once, at the end (:mod:`cskd_ray.app.demo_eval`), for the final table whose rows are the paper's claims.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cskd_ray.io import storage

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "jobs" / "configs" / "demo"
DEFAULT_FEATURES_CONFIG = CONFIGS / "features-proxy.yaml"
DEFAULT_ALIGN_CONFIG = CONFIGS / "align.yaml"
DEFAULT_TEACHER_CONFIG = CONFIGS / "teacher.yaml"
DEFAULT_HOU_TEACHER_CONFIG = CONFIGS / "teacher-classifiers.yaml"
DEFAULT_LABEL_CONFIG = CONFIGS / "label.yaml"
DEFAULT_DISTILL_CONFIG = CONFIGS / "distill.yaml"
VAL_FRACTION = 0.25  # of the labeled non-test images; the demo configs say labels.val_fraction: 0.25


@dataclass
class DemoPlan:
    """Sizes of one demo run (``cskd-ray demo`` and ``benchmarks/bench_quality.py`` share this flow).

    Attributes:
        num_images: Generated images (labeled + unlabeled).
        labeled_fraction: Fraction of them with vote labels; 30% of those are the test split and
            ``VAL_FRACTION`` of the rest the validation split.
        image_size: Side of the generated images in pixels.
        teacher_encoder: timm name of the teacher's encoder (larger than the student's; the paper: ViT-B/16).
        student_encoder: timm name of the student's encoder (the paper: mobilenetv3_small_100).
        encoder_image_size: Input side of convolutional encoders (``encoder.image_size``); None: timm's.
        align_epochs: Phase 1 epochs over every image (CLIP targets, no labels).
        teacher_epochs: Teacher epochs over the labeled training rows.
        labels_epochs: Epochs of the labels-only students over the labeled training rows.
        cskd_epochs: CSKD epochs over labeled + unlabeled rows.
        clip: ``name:pretrained`` overriding the features config's CLIP, e.g. ``ViT-B-32:openai``.
        features_config: The features config (default ``jobs/configs/demo/features-proxy.yaml``).
        extra: Per-stage ``--set`` overrides, by stage name (``teacher``, ``distill``, ``align``; ``hou_teacher``
            for the combined teacher of the ``multi_teacher`` arm).
    """

    num_images: int = 800
    labeled_fraction: float = 0.35
    image_size: int = 64
    teacher_encoder: str = "test_vit2"
    student_encoder: str = "test_vit"
    encoder_image_size: int | None = None
    align_epochs: int = 2
    teacher_epochs: int = 8
    labels_epochs: int = 8
    cskd_epochs: int = 2
    clip: str | None = None
    features_config: str = str(DEFAULT_FEATURES_CONFIG)
    extra: dict[str, list[str]] = field(default_factory=dict)


def _stage(stage: str, config: Path | str, overrides: list[str], inputs: list[str], output: Path,
           say: Callable[[str], None], what: str) -> dict[str, Any]:
    """Runs one stage in the current Ray session and prints one line: what it did and how long it took."""
    import importlib

    from cskd_ray.stages import check_stage, load_config

    start = time.perf_counter()
    cfg = load_config(stage, str(config), overrides, input_uris=inputs, output_uri=str(output))
    check_stage(stage, cfg)
    module = importlib.import_module(f"cskd_ray.stages.{stage}")
    if stage in ("features", "label"):
        result = module.run(cfg, progress=lambda line: None)
    else:
        result = module.run(cfg)
    out = result.to_dict() if hasattr(result, "to_dict") else module.result_dict(result)
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    metric = out.get("metrics", {}).get("val_srcc")
    detail = f", validation SRCC {metric:.3f}" if metric is not None else ""
    say(f"demo: {what:<58} {out['wall_seconds']:6.1f} s{detail}")
    return out


def prepare(work: Path, plan: DemoPlan, say: Callable[[str], None]) -> dict[str, Any]:
    """Demo data, the CLIP feature cache and the two aligned encoders (what every seed shares)."""
    from cskd_ray.io.demo import make_demo_data

    start = time.perf_counter()
    data = make_demo_data(work / "data", plan.num_images, plan.labeled_fraction, seed=0, image_size=plan.image_size,
                          num_corrupt=3, workers=min(2, os.cpu_count() or 1), val_fraction=VAL_FRACTION)
    what = f"data: {data.num_images} images, {data.num_labeled} labeled ({data.num_test} test), 3 corrupt"
    say(f"demo: {what:<58} {time.perf_counter() - start:6.1f} s")
    clip = []
    if plan.clip:
        name, _, pretrained = plan.clip.partition(":")
        clip = [f"clip.name={name}", f"clip.pretrained={pretrained or 'null'}"]
    features = _stage("features", plan.features_config, clip, [data.images_dir], work / "features", say,
                      f"features: CLIP {(plan.clip or 'cskd-proxy-rn:proxy')} over every image")
    aligned = {}
    size = [f"encoder.image_size={plan.encoder_image_size}"] if plan.encoder_image_size else []
    for role, encoder in (("teacher", plan.teacher_encoder), ("student", plan.student_encoder)):
        _stage("align", DEFAULT_ALIGN_CONFIG, [f"encoder.name={encoder}", f"train.epochs={plan.align_epochs}",
                                               *size,
                                               *plan.extra.get("align", [])],
               [str(work / "features")], work / f"align-{role}", say, f"phase 1: align the {role} encoder ({encoder})")
        aligned[role] = str(work / f"align-{role}" / "model")
    return {"data": data, "features": features, "aligned": aligned}


def train_arms(work: Path, run: Path, shared: dict[str, Any], plan: DemoPlan, seed: int,
               say: Callable[[str], None], arms: tuple[str, ...] = ("cskd", "aligned_only", "labels_only")
               ) -> dict[str, dict]:
    """Teacher → pseudo-labels → students, for one training seed; each selects its checkpoint on validation.

    The ``multi_teacher`` arm first trains Hou et al.'s combined teacher (``hou_teacher``: frozen classifiers
    pooled at several levels + an MLP head on the labels, ``teacher-classifiers.yaml``), then a student not
    aligned on the labels and that teacher's hidden layer and predictions (``hou_teacher``; no pseudo-labels).
    """
    data = shared["data"]
    images = str(Path(data.images_dir).resolve())
    common = [f"labels.images_root={images}", f"labels.test_list={Path(data.test_list_path).resolve()}",
              "labels.val_split=val", f"labels.val_fraction={VAL_FRACTION}", f"train.seed={seed}"]
    results = {"teacher": _stage("teacher", DEFAULT_TEACHER_CONFIG,
                                 [*common, f"aligned={shared['aligned']['teacher']}",
                                  f"train.epochs={plan.teacher_epochs}", *plan.extra.get("teacher", [])],
                                 [data.ava_path], run / "teacher", say,
                                 f"phase 2a: teacher ({plan.teacher_encoder}, aligned) on the labels")}
    _stage("label", DEFAULT_LABEL_CONFIG, [f"model={run / 'teacher' / 'model'}"],
           [str(Path(data.output) / "unlabeled.csv")], run / "pseudo-labels", say,
           "phase 2b: the teacher pseudo-labels the unlabeled images")
    if "multi_teacher" in arms:
        hou = [*common, f"classifiers.image_size={plan.encoder_image_size or plan.image_size}",
               f"train.epochs={plan.teacher_epochs}", *plan.extra.get("hou_teacher", [])]
        results["hou_teacher"] = _stage("teacher", DEFAULT_HOU_TEACHER_CONFIG, hou, [data.ava_path],
                                        run / arm_folder("hou_teacher"), say,
                                        "combined teacher (frozen classifiers + MLP head) on the labels")
    student = [*common, f"pseudo_labels={run / 'pseudo-labels'}", f"features={work / 'features'}",
               *plan.extra.get("distill", [])]
    size = [f"encoder.image_size={plan.encoder_image_size}"] if plan.encoder_image_size else []
    variants = {
        "cskd": ([f"aligned={shared['aligned']['student']}", f"train.epochs={plan.cskd_epochs}"],
                 "phase 2c: CSKD student (labels + pseudo-labels + CLIP)"),
        "pseudo_only": (["aligned=null", f"encoder.name={plan.student_encoder}", "feat_weight=0", *size,
                         f"train.epochs={plan.cskd_epochs}"], "student not aligned, labels + pseudo-labels"),
        "aligned_only": ([f"aligned={shared['aligned']['student']}", "kd_weight=0", "feat_weight=0",
                          f"train.epochs={plan.labels_epochs}"], "student aligned, labels only"),
        "labels_only": (["aligned=null", f"encoder.name={plan.student_encoder}", "kd_weight=0", "feat_weight=0", *size,
                         f"train.epochs={plan.labels_epochs}"], "student not aligned, labels only"),
        "multi_teacher": (["aligned=null", f"encoder.name={plan.student_encoder}", "kd_weight=0", "feat_weight=0",
                           *size, f"hou_teacher={run / arm_folder('hou_teacher') / 'model'}",
                           f"train.epochs={plan.cskd_epochs}"], "student not aligned, labels + combined teacher"),
    }
    for arm in arms:
        overrides, what = variants[arm]
        results[arm] = _stage("distill", DEFAULT_DISTILL_CONFIG, [*student, *overrides], [data.ava_path],
                              run / arm_folder(arm), say, what)
    return results


def arm_folder(arm: str) -> str:
    """The run folder of an arm: ``teacher``, ``student`` (CSKD: the README's examples use it), ``student-<arm>``.

    The combined teacher of the ``multi_teacher`` arm (``hou_teacher``) trains into ``teacher-classifiers``.
    """
    if arm == "hou_teacher":
        return "teacher-classifiers"
    return arm if arm == "teacher" else "student" if arm == "cskd" else f"student-{arm.replace('_', '-')}"


ARM_NAMES = {"teacher": "teacher", "cskd": "student, CSKD", "pseudo_only": "student, pseudo-labels only",
             "aligned_only": "student, aligned + labels", "labels_only": "student, labels only",
             "hou_teacher": "combined teacher (Hou)", "multi_teacher": "student, multi-teacher (Hou)"}
TEACHERS = ("teacher", "hou_teacher")


def run_demo(workdir: str = "runs/demo", num_images: int | None = None, features_config: str | None = None,
             *, clip: str | None = None, verbose: bool = False, plan: DemoPlan | None = None) -> dict:
    """Runs the demo under ``workdir``; prints one line per stage, the final table and the report path.

    Args:
        workdir: Where data and outputs go.
        num_images: Generated images (default :class:`DemoPlan`'s).
        features_config: Ignored unless given: a features config replacing ``features-proxy.yaml``.
        clip: ``name:pretrained`` of the CLIP to use instead of the proxy, e.g. ``ViT-B-32:openai``.
        verbose: Show Ray's and open_clip's own log lines.
        plan: Sizes; ``num_images`` and ``clip`` override it.
    """
    from cskd_ray.app.demo_eval import evaluate_on_test
    from cskd_ray.app.report import write_report
    from cskd_ray.app.runtime import init_ray, quiet_logs

    plan = plan or DemoPlan()
    if num_images is not None:
        plan.num_images = num_images
    if clip is not None:
        plan.clip = clip
    if features_config:
        plan.features_config = features_config
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    work = Path(workdir).resolve()
    say = print
    if not verbose:
        quiet_logs()
        logging.getLogger("cskd_ray.models.registry").setLevel(logging.ERROR)  # the demo says it uses a proxy
    init_ray(quiet=not verbose)
    if not verbose:
        quiet_logs()  # Ray Data configures its own loggers when Ray starts
    say(f"demo: Ray started in {time.perf_counter() - start:.1f} s (one session for every stage)")
    if not plan.clip:
        say("demo: CLIP here is a PROXY (cskd-proxy-rn): a tiny tower pre-trained on the demo generator's latent "
            "image properties, never on aesthetic scores; it is not OpenAI's CLIP\n"
            "      (real weights: cskd-ray demo --clip ViT-B-32:openai)")
    shared = prepare(work, plan, say)
    results = train_arms(work, work, shared, plan, seed=0, say=say)
    data = shared["data"]
    t0 = time.perf_counter()
    models = {arm: str(work / arm_folder(arm) / "model") for arm in results}
    test = evaluate_on_test(models, data.ava_path, data.images_dir, data.test_list_path)
    say(f"demo: {'test split, read once: every model scored':<58} {time.perf_counter() - t0:6.1f} s")
    for arm, metrics in test.items():  # the run report lists these under "Evaluations"
        storage.write_text_once(str(work / f"test-{arm_folder(arm)}" / "metrics.json"), json.dumps(
            {"model": models[arm], "split": "test", **metrics}, indent=2), overwrite=True)
    total = round(time.perf_counter() - start, 1)
    say(claims_table(test))
    summary = {"workdir": str(work), "plan": asdict(plan), "data": data.__dict__, "stages": results,
               "features": shared["features"], "test": test, "total_seconds": total}
    storage.write_text_once(str(work / "summary.json"), json.dumps(summary, indent=2, default=str), overwrite=True)
    report = write_report(str(work)).output
    say(f"demo: done in {total:.1f} s; summary {work / 'summary.json'}; report {report}")
    return summary


def claims_table(test: dict[str, dict]) -> str:
    """The test-split table and the paper's claims (a)-(d), each as a row with its measured figures."""
    lines = [f"{'model (test split, read once)':<34}{'SRCC':>8}{'PLCC':>8}{'accuracy':>10}{'img/s':>9}", "-" * 69]
    for arm, m in test.items():
        lines.append(f"{ARM_NAMES.get(arm, arm):<34}{m['srcc']:>8.3f}{m['plcc']:>8.3f}{m['accuracy']:>10.3f}"
                     f"{m['images_per_s']:>9.0f}")
    s = {arm: m["srcc"] for arm, m in test.items()}
    claims = []
    if "aligned_only" in s and "labels_only" in s:
        claims.append(("(a) aligned student beats the same student not aligned", s["aligned_only"] - s["labels_only"]))
    if "cskd" in s and "labels_only" in s:
        claims.append(("(b) CSKD student beats the labels-only student", s["cskd"] - s["labels_only"]))
    if "teacher" in s and "cskd" in s:
        best = max(v for k, v in s.items() if k not in TEACHERS)
        claims.append(("(c) teacher beats every student", s["teacher"] - best))
    lines += ["", f"{'claim':<58}{'SRCC gap':>10}{'holds':>7}", "-" * 75]
    lines += [f"{name:<58}{gap:>+10.3f}{'yes' if gap > 0 else 'NO':>7}" for name, gap in claims]
    if "teacher" in test and "cskd" in test:
        ratio = test["cskd"]["images_per_s"] / test["teacher"]["images_per_s"]
        lines.append(f"{'(d) student is N times faster than the teacher (forward img/s)':<58}{ratio:>9.1f}x"
                     f"{'yes' if ratio > 1 else 'NO':>7}")
    lines.append("One seed, a few dozen test images: see docs/benchmarks.md (bench_quality, 3 seeds) for the spread.")
    return "\n".join(lines)
