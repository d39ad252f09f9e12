"""The Ray Jobs path for real: ``ray job submit --working-dir .`` of ``jobs/pipeline.py`` to a ``ray start --head``
of our own (the session's ``ray_head``: loopback, own ports and temp dir, token auth on; tests/ray_head.py), and
stage jobs whose inputs are missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray_head import RayHead

from cskd_ray.app.cli import main

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAINING_STAGES = ("align_teacher", "align_student", "teacher", "distill")
RUNTIME_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _pipeline_args(tmp: Path) -> list[str]:
    """``jobs/pipeline.py`` and its arguments: the demo pipeline, tiny (60 images, 2 steps per training stage),
    everything under ``tmp``."""
    data, steps = tmp / "data", "train.max_steps=2"
    sets = [
        f"demo_data.output={data}",
        "demo_data.num_images=60",
        f"input=[{data}/unlabeled.csv]",
        f"label_file={data}/AVA.txt",
        f"labels.images_root={data}/images",
        f"labels.test_list={data}/test.jpgl",
        "labels.val_split=test",  # 15 labeled images: the test rows validate
        "labels.val_fraction=0",
        f"score_input=[{data}/images]",
        f"stages.align_teacher.set=[encoder.name=test_vit2, {steps}]",
        f"stages.align_student.set=[{steps}]",
        f"stages.teacher.set=[{steps}, train.batch_size=8]",
        f"stages.distill.set=[{steps}, train.batch_size=8]",
    ]
    return [
        "python",
        "jobs/pipeline.py",
        "jobs/configs/demo/pipeline.yaml",
        "--output",
        str(tmp / "run"),
        *(arg for item in sets for arg in ("--set", item)),
    ]


@pytest.mark.timeout(900)  # ~1.5 min on an idle 2-core machine
def test_pipeline_job_runs_every_stage_then_a_rerun_skips_complete_ones(
    ray_head: RayHead, ray_session, tmp_path: Path, capsys
) -> None:
    """One real pipeline job; then the same pipeline again in this process (the session's Ray), as a resubmitted
    job would run it: the training stages and the evaluation are skipped, the image passes find nothing to do."""
    from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable

    args, run = _pipeline_args(tmp_path), tmp_path / "run"
    assert ray_head.submit("cskd-pipeline", *args) == "SUCCEEDED", ray_head.logs("cskd-pipeline")[-4000:]
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == dict.fromkeys(
        ("features", *TRAINING_STAGES[:3], "label", "distill", "evaluate", "score"), "ran"
    )
    for folder in ("align-teacher", "align-student", "teacher", "student"):
        assert (run / folder / "model" / "model.json").is_file(), folder
    for folder in ("features", "pseudo-labels", "scores"):
        assert (run / folder / "_meta.json").is_file(), folder
    for which in ("teacher", "student"):
        assert "srcc" in json.dumps(json.loads((run / f"evaluate-{which}" / "metrics.json").read_text()))
    images = sorted(str(p) for p in (tmp_path / "data" / "images").iterdir())
    scores = ResultTable(str(run / "scores"), LABEL_SCHEMA).read(["uri", "score", "error"]).to_pydict()
    assert sorted(scores["uri"]) == images  # one row per input image, no duplicates, corrupt ones as error rows
    errors = [e for e in scores["error"] if e]
    assert 0 < len(errors) < len(images)
    assert "pipeline: done" in ray_head.logs("cskd-pipeline")

    capsys.readouterr()
    assert main(["pipeline", str(REPO / args[2]), *args[3:]]) == 0
    logs = capsys.readouterr().out
    again = json.loads((run / "pipeline_summary.json").read_text())["stages"]
    assert {name: again[name]["status"] for name in (*TRAINING_STAGES, "evaluate")} == dict.fromkeys(
        (*TRAINING_STAGES, "evaluate"), "complete"
    )
    for name in ("features", "label", "score"):  # the image passes resume: nothing left to compute
        assert again[name]["status"] == "ran"
    assert all(f"pipeline: {name}: already complete, skipped" in logs for name in TRAINING_STAGES), logs[-3000:]
    rescored = ResultTable(str(run / "scores"), LABEL_SCHEMA).read(["uri"]).to_pydict()["uri"]
    assert sorted(rescored) == images


def test_stage_job_with_missing_inputs_fails_naming_the_stage_to_run_first(
    ray_head: RayHead, tmp_path: Path, demo_data: Path
) -> None:
    (tmp_path / "empty").mkdir()
    job = [
        "python",
        "jobs/teacher.py",
        "jobs/configs/demo/teacher.yaml",
        "--output",
        str(tmp_path / "teacher"),
        "--input",
        str(demo_data / "AVA.txt"),
        "--set",
        f"labels.images_root={demo_data / 'images'}",
        "--set",
        f"labels.test_list={demo_data / 'test.jpgl'}",
        "--set",
        f"aligned={tmp_path / 'empty'}",
    ]
    assert ray_head.submit("cskd-teacher-missing", *job, timeout=300) == "FAILED"
    logs = ray_head.logs("cskd-teacher-missing")
    assert f"error: aligned {tmp_path / 'empty'}: not a model folder (no model.json); run `align` first" in logs


@pytest.mark.parametrize(
    "stage, missing, first",
    [
        ("align", ["--input", "{empty}"], "features"),
        ("teacher", ["--set", "aligned={empty}"], "align"),
        ("label", ["--input", "{images}", "--set", "model={empty}"], "teacher"),
        ("distill", ["--set", "pseudo_labels={empty}"], "label"),
        ("distill", ["--set", "pseudo_labels={labels}", "--set", "features={empty}/features"], "features"),
    ],
)
def test_stage_entry_with_missing_inputs_names_the_stage_to_run_first(
    stage: str, missing: list[str], first: str, tmp_path: Path, demo_data: Path, capsys
) -> None:
    """What each ``jobs/<stage>.py`` runs (``cli.main``), before Ray starts: exit 2, one line naming the stage."""
    (tmp_path / "empty").mkdir()
    labels = tmp_path / "labels"  # a pseudo-label table needs only its _meta.json to pass the existence check
    labels.mkdir()
    (labels / "_meta.json").write_text("{}")
    paths = {"empty": tmp_path / "empty", "images": demo_data / "images", "labels": labels}
    argv = [stage, str(REPO / "jobs/configs/demo" / f"{stage}.yaml"), "--output", str(tmp_path / "out")]
    if stage in ("teacher", "distill"):
        argv += [
            "--input",
            str(demo_data / "AVA.txt"),
            "--set",
            f"labels.images_root={demo_data / 'images'}",
            "--set",
            f"labels.test_list={demo_data / 'test.jpgl'}",
            "--set",
            "aligned=null",
        ]
    argv += [arg.format(**paths) for arg in missing]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"run `{first}` first" in err[0], err
