"""The whole CSKD pipeline as one job (``jobs/pipeline.py``), every stage writing under one run folder.

A stage whose output is already complete is skipped, so a killed or failed job is simply rerun.

Order and wiring (``OUT`` is the pipeline's ``output``; each stage's own YAML gives everything else)::

    features       input           → OUT/features          (CLIP feature cache)
    align_teacher  OUT/features    → OUT/align-teacher     (phase 1, the future teacher's encoder)
    align_student  OUT/features    → OUT/align-student     (phase 1, the future student's encoder)
    teacher        label_file      → OUT/teacher           (phase 2a, aligned = OUT/align-teacher/model)
    label          input           → OUT/pseudo-labels     (phase 2b, model = OUT/teacher/model)
    distill        label_file      → OUT/student           (phase 2c, aligned = OUT/align-student/model)
    evaluate       label_file      → OUT/evaluate-{teacher,student}
    score          score_input     → OUT/scores            (bulk scoring with the student)

Completeness: the image passes (features, label, score) resume by themselves and compute only what is
missing; a training stage is complete when its exported ``model/model.json`` exists; evaluate when its
``metrics.json`` exists. The job's summary goes to ``OUT/pipeline_summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from cskd_ray.config import ConfigError, StrictModel, resolve_config
from cskd_ray.io import storage
from cskd_ray.io.labels import LabelsConfig

PIPELINE_STAGES = ("features", "align_teacher", "align_student", "teacher", "label", "distill", "evaluate", "score")


class PipelineStageConfig(StrictModel):
    """One stage of the pipeline job: its YAML config plus ``--set`` overrides (paths are wired by the job)."""

    config: str | None = Field(None, description="The stage's YAML config; null: the stage's defaults.")
    set: list[str] = Field(default_factory=list, description="Overrides, as for --set key=value.")


class DemoDataConfig(StrictModel):
    """Generate demo data into ``output`` first (skipped when it is already there)."""

    output: str = Field(description="Folder for the demo images, AVA.txt, test.jpgl and manifests.")
    num_images: int = Field(200, ge=10, description="Images to generate.")
    labeled_fraction: float = Field(0.25, gt=0, lt=1, description="Share of the images that get labels.")
    image_size: int = Field(64, ge=32, description="Side of the generated images in pixels.")
    num_corrupt: int = Field(3, ge=0, description="Broken files added (they must become error rows).")
    seed: int = Field(0, description="Seed of the generated images and labels.")


class PipelineConfig(StrictModel):
    """The whole CSKD pipeline as one job, every stage writing under ``output``; complete stages are skipped.

    Order: features → align (teacher, student) → teacher → label → distill → evaluate → score.
    """

    input: list[str] = Field(description="Unlabeled images: folders, prefixes, globs or manifests.")
    output: str = Field(description="Run folder; each stage writes to a sub-folder named after it.")
    label_file: str = Field(description="Label file for teacher, distill and evaluate (in labels.format).")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="How to read `label_file`.")
    score_input: list[str] | None = Field(None, description="Images to bulk-score; null: `input`.")
    demo_data: DemoDataConfig | None = Field(None, description="Generate demo data before the first stage.")
    stages: dict[Literal[PIPELINE_STAGES], PipelineStageConfig] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Per-stage config and overrides; a stage not listed uses defaults.")
    skip: list[Literal[PIPELINE_STAGES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Stages not to run (their outputs must exist when later stages need them).")

    @field_validator("input", "score_input", mode="before")
    @classmethod
    def _string_is_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


Printer = Callable[[str], None]


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                         input_uris: list[str] | None = None, output_uri: str | None = None) -> PipelineConfig:
    """The pipeline's config from a YAML file, ``--set`` overrides and ``--input``/``--output`` flags.

    Raises:
        ConfigError: The file is missing or not a mapping, a key is unknown, or a value is invalid.
    """
    return resolve_config(PipelineConfig, path, overrides, input_uris=input_uris, output_uri=output_uri,
                          name="pipeline")


def _stage_args(cfg: PipelineConfig, name: str) -> tuple[str | None, list[str]]:
    stage = cfg.stages.get(name)
    return (stage.config, list(stage.set)) if stage is not None else (None, [])


def _labels_overrides(cfg: PipelineConfig) -> list[str]:
    labels = cfg.labels
    out = [f"labels.format={labels.format}", f"labels.val_split={labels.val_split}",
           f"labels.val_fraction={labels.val_fraction}"]
    out += [f"labels.{key}={value}" for key, value in (("images_root", labels.images_root),
                                                        ("test_list", labels.test_list),
                                                        ("threshold", labels.threshold)) if value is not None]
    return out


def _trained(folder: str) -> bool:
    return storage.exists(storage.join(folder, "model", "model.json"))


def make_demo_inputs(cfg: PipelineConfig, say: Printer) -> None:
    """Generate the demo data the config asks for, unless it is already there."""
    if cfg.demo_data is None:
        return
    from cskd_ray.io.demo import make_demo_data

    demo = cfg.demo_data
    if (Path(demo.output) / "AVA.txt").exists():
        say(f"pipeline: demo data already in {demo.output}")
        return
    say(f"pipeline: generating {demo.num_images} demo images in {demo.output} ...")
    make_demo_data(demo.output, demo.num_images, demo.labeled_fraction, demo.seed, image_size=demo.image_size,
                   num_corrupt=demo.num_corrupt)


def check_test_split(cfg: PipelineConfig) -> None:
    """Fail before any stage runs when the label file has no ``test`` rows (``evaluate`` reads that split only)."""
    from cskd_ray.io.labels import load_labels

    labels = cfg.labels
    table = load_labels(labels.format, cfg.label_file, labels.images_root, test_list=labels.test_list)
    if "test" not in set(table.column("split").to_pylist()):
        raise ConfigError(f"label_file {cfg.label_file}: no rows in split 'test', which evaluate reads once at the "
                          "end; give labels.test_list (AVA) or a label file with a test split, or add evaluate to "
                          "skip")


def run_pipeline(cfg: PipelineConfig, say: Printer = print) -> dict[str, Any]:
    """Run every stage not in ``cfg.skip`` in order, skipping complete ones; returns and saves the summary."""
    from cskd_ray.app.commands import run_align_command, run_features_command, run_label_command, run_supervised_command

    start, out = time.perf_counter(), cfg.output
    paths = {name: storage.join(out, name) for name in
             ("features", "align-teacher", "align-student", "teacher", "pseudo-labels", "student", "scores")}
    summary: dict[str, Any] = {"output": out, "stages": {}}

    def stage(name: str, done: bool, run: Callable[[], Any]) -> None:
        if name in cfg.skip:
            say(f"pipeline: {name}: skipped (listed in skip)")
            summary["stages"][name] = {"status": "skipped"}
        elif done:
            say(f"pipeline: {name}: already complete, skipped")
            summary["stages"][name] = {"status": "complete"}
        else:
            say(f"pipeline: {name}: running")
            began = time.perf_counter()
            summary["stages"][name] = {"status": "ran", "result": run(),
                                       "seconds": round(time.perf_counter() - began, 2)}

    make_demo_inputs(cfg, say)
    if "evaluate" not in cfg.skip:
        check_test_split(cfg)
    labels = _labels_overrides(cfg)
    stage("features", False, lambda: run_features_command(*_stage_args(cfg, "features"), cfg.input,
                                                          paths["features"]))
    for which in ("teacher", "student"):
        name, folder = f"align_{which}", paths[f"align-{which}"]
        stage(name, _trained(folder), lambda name=name, folder=folder: run_align_command(
            *_stage_args(cfg, name), [paths["features"]], folder))
    config, overrides = _stage_args(cfg, "teacher")
    stage("teacher", _trained(paths["teacher"]), lambda: run_supervised_command(
        "teacher", config, [*labels, f"aligned={storage.join(paths['align-teacher'], 'model')}", *overrides],
        [cfg.label_file], paths["teacher"]))
    teacher_model = storage.join(paths["teacher"], "model")
    config, overrides = _stage_args(cfg, "label")
    stage("label", False, lambda: run_label_command(config, [f"model={teacher_model}", *overrides], cfg.input,
                                                    paths["pseudo-labels"]))
    config, overrides = _stage_args(cfg, "distill")
    wiring = [f"aligned={storage.join(paths['align-student'], 'model')}", f"pseudo_labels={paths['pseudo-labels']}",
              f"features={paths['features']}"]
    stage("distill", _trained(paths["student"]), lambda: run_supervised_command(
        "distill", config, [*labels, *wiring, *overrides], [cfg.label_file], paths["student"]))
    student_model = storage.join(paths["student"], "model")
    evaluations = {which: storage.join(out, f"evaluate-{which}") for which in ("teacher", "student")}
    stage("evaluate", all(storage.exists(storage.join(e, "metrics.json")) for e in evaluations.values()),
          lambda: _evaluate(cfg, {"teacher": teacher_model, "student": student_model}, evaluations, say))
    stage("score", False, lambda: _score(cfg, student_model, paths["scores"], say))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    storage.write_text_once(storage.join(out, "pipeline_summary.json"), json.dumps(summary, indent=2, default=str),
                            overwrite=True)
    say(f"pipeline: done in {summary['seconds']:.1f} s; student at {student_model}; summary at "
        f"{storage.join(out, 'pipeline_summary.json')}")
    return summary


def _evaluate(cfg: PipelineConfig, models: dict[str, str], outputs: dict[str, str], say: Printer) -> dict:
    from cskd_ray.app.runtime import init_ray
    from cskd_ray.stages.evaluate import EvaluateConfig, format_table, run

    init_ray()
    reports = {}
    for which, model in models.items():
        labels = cfg.labels
        reports[which] = run(EvaluateConfig(model, labels.format, cfg.label_file, outputs[which],
                                            labels.images_root, labels.test_list, "test", labels.threshold))
        say(f"pipeline: {which} on the 'test' split (selection used {labels.val_split!r}):\n"
            f"{format_table(reports[which])}")
    return reports


def _score(cfg: PipelineConfig, model: str, output: str, say: Printer) -> dict:
    from cskd_ray.app.commands import run_score_command

    config, overrides = _stage_args(cfg, "score")
    return run_score_command(model, cfg.score_input or cfg.input, output, config, overrides, printer=say)
