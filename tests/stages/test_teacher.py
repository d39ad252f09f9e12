"""Phase 2a: the teacher trains on labels with the right head and loss, validates, and exports its best model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from cskd_ray.config import ConfigError
from cskd_ray.losses import emd_loss
from cskd_ray.stages import load_config
from cskd_ray.stages.teacher import run as run_teacher
from cskd_ray.train.supervise import HeadSpec, SupervisedTask

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
CONFIG = REPO / "jobs" / "configs" / "demo" / "teacher.yaml"


def _cfg(demo: Path, output: Path, *overrides: str, labels: Path | None = None):
    base = [f"labels.images_root={demo / 'images'}", f"labels.test_list={demo / 'test.jpgl'}", "aligned=null",
            "labels.val_split=test", "labels.val_fraction=0",  # 15 labeled images: the test rows validate
            "train.batch_size=4", "train.epochs=2", "train.warmup_steps=1", "decode_batch_size=4"]
    return load_config("teacher", CONFIG, [*base, *overrides], input_uris=[str(labels or demo / "AVA.txt")],
                       output_uri=str(output))


def _batch(n: int = 4, size: int = 160) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    dist = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    return {"pixels": torch.from_numpy(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)),
            "valid": torch.tensor([1] * (n - 1) + [0], dtype=torch.uint8),
            "score": torch.from_numpy((dist * np.arange(1, 11)).sum(1)), "distribution": torch.from_numpy(dist)}


def test_distribution_task_uses_emd_r2_on_valid_rows_and_validates(demo_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo_data, tmp_path)
    task = SupervisedTask(cfg.model_dump(), {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0,
                                             "threshold": 5.0})
    batch = _batch()
    out = task(batch)
    probs = task._outputs(batch)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    expected = emd_loss(probs[:3], batch["distribution"][:3], r=2.0)  # the invalid last row is left out
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is not None for p in task.trainable_parameters() if p.requires_grad)
    metrics = task.validate([batch, batch])
    assert set(metrics) == {"val_srcc", "val_plcc", "val_accuracy", "val_emd"}
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["val_emd"] >= 0.0


def test_scalar_head_maps_back_to_the_dataset_scale() -> None:
    spec = HeadSpec("scalar", 1, low=2.0, high=6.0, threshold=4.0)
    torch.testing.assert_close(spec.to_score(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([2.0, 4.0, 6.0]))
    dist = HeadSpec("distribution", 3, 0, 0, 2.0)
    torch.testing.assert_close(dist.to_score(torch.tensor([[0.0, 0.5, 0.5]])), torch.tensor([2.5]))


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_trains_on_ava_labels_and_exports_the_best_checkpoint(teacher_run: Path, demo_data: Path) -> None:
    """The session's teacher (tests/conftest.py ``teacher_run``: two runs, the second resumed) and its evaluation."""
    result = json.loads((teacher_run / "teacher-result.json").read_text())
    teacher = teacher_run / "teacher"
    assert result["head"]["kind"] == "distribution" and result["head"]["bins"] == 10
    assert result["head"]["threshold"] == 5.0
    assert result["train_rows"] + result["val_rows"] == 15 and result["val_rows"] == len(
        (demo_data / "test.jpgl").read_text().split())
    description = json.loads((teacher / "model" / "model.json").read_text())
    assert description["stage"] == "teacher" and description["head"]["kind"] == "distribution"
    assert {"val_srcc", "val_plcc", "val_accuracy", "val_emd"} <= set(description["metrics"])
    assert (teacher / "model" / "model.safetensors").stat().st_size > 10_000
    assert len(list((teacher / "train").glob("checkpoint_2*"))) <= 2  # train.keep_checkpoints
    # `evaluate` scores the validation split through Ray Data and must agree with the teacher's own validation
    report = json.loads((teacher_run / "evaluate-teacher" / "metrics.json").read_text())
    assert report["scored"] == result["val_rows"] and report["threshold"] == 5.0
    for name in ("srcc", "plcc", "accuracy", "emd"):
        assert report[name] == pytest.approx(description["metrics"][f"val_{name}"], abs=1e-4), name


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_on_scalar_labels_uses_a_regression_head(ray_session, demo_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Also the Train-run check of experiment tracking (cskd_ray/train/tracking.py): rank 0 logs this run into an MLflow
    file store, its params are the resolved config and its metrics one entry per checkpoint report."""
    rows = [line.split(",") for line in (demo_data / "manifest.csv").read_text().splitlines()[1:]]
    labeled = [r for r in rows if r[3] in ("train", "test")]
    csv = tmp_path / "train.csv"
    csv.write_text("uri,score,split\n" + "".join(f"{r[0]},{r[4]},{r[3]}\n" for r in labeled))
    mlruns = (tmp_path / "mlruns").as_uri()
    tracking = ["train.tracking.backend=mlflow", f"train.tracking.tracking_uri={mlruns}",
                "train.tracking.experiment=scalar-teacher"]
    result = run_teacher(_cfg(demo_data, tmp_path / "scalar", "labels.format=csv", "labels.test_list=null",
                              "train.epochs=1", *tracking, labels=csv))
    assert result.head["kind"] == "scalar" and result.head["low"] < result.head["high"]
    assert "val_emd" not in result.metrics and "val_srcc" in result.metrics
    _assert_tracked(tmp_path / "scalar", mlruns, "scalar-teacher", monkeypatch)


def _assert_tracked(output: Path, mlruns: str, experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One finished MLflow run: params = the flattened resolved config, metrics = the loop's reports, and the last
    checkpoint."""
    import math

    from mlflow.tracking import MlflowClient

    from cskd_ray.train.history import read_history
    from cskd_ray.train.tracking import flatten

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it here; the worker opted in by itself
    client = MlflowClient(mlruns)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    config = json.loads((output / "model" / "model.json").read_text())["config"]
    assert run.info.status == "FINISHED" and run.info.run_name == output.name
    assert run.data.params == {key: str(value) for key, value in flatten(config).items()}
    assert run.data.params["labels.format"] == "csv" and run.data.params["train.tracking.backend"] == "mlflow"
    reports = [r for r in read_history((output / "metrics.jsonl").read_text()) if "val_srcc" in r]  # validated
    assert reports  # checkpoint_every 100: the loop reports (and validates) at each epoch's end only
    loss = client.get_metric_history(run.info.run_id, "loss")
    srcc = client.get_metric_history(run.info.run_id, "val_srcc")
    assert [m.step for m in loss] == [m.step for m in srcc] == [r["step"] for r in reports]
    assert [m.value for m in loss] == [r["loss"] for r in reports]
    assert [None if math.isnan(m.value) else m.value for m in srcc] == [r["val_srcc"] for r in reports]
    checkpoint = run.data.tags["cskd.checkpoint"]
    assert checkpoint.startswith(str(output / "train" / "checkpoint_")) and Path(checkpoint, "state.json").is_file()
    assert json.loads(Path(checkpoint, "state.json").read_text())["step"] == reports[-1]["step"]


def test_missing_validation_split_is_a_config_error(ray_session, demo_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"labels.val_split 'val'.*0 validation rows"):
        run_teacher(_cfg(demo_data, tmp_path / "x", "labels.val_split=val"))
