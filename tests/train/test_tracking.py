"""Experiment tracking (cskd_ray/train/tracking.py) without Ray: what the worker loop's run and Tune's callback log.

The Train-run check (rank 0 of a real teacher run logs into MLflow) is in tests/stages/test_teacher.py, on the
scalar-label teacher run. Everything here writes to a local MLflow file store; nothing reaches the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from conftest import CONFIGS

from cskd_ray.config import ConfigError
from cskd_ray.stages import load_config
from cskd_ray.stages.tune import TuneConfig
from cskd_ray.train.tracking import (
    TrackingConfig,
    checkpoint_uri,
    flatten,
    mlflow_uri,
    start_worker_run,
    tune_callbacks,
    without_tracking,
)

pytest.importorskip("mlflow")  # the dev extra installs mlflow-skinny


@pytest.fixture(autouse=True)
def _file_stores_not_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 refuses file stores without MLFLOW_ALLOW_FILE_STORE: the code under test must opt in itself (the
    variable is unset here and restored afterwards)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def _teacher(tmp_path: Path, *overrides: str):
    return load_config("teacher", CONFIGS / "teacher.yaml", list(overrides), input_uris=[str(tmp_path / "AVA.txt")],
                       output_uri=str(tmp_path / "teacher"))


def _runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found is not None else []


def test_worker_run_logs_the_flattened_config_each_report_and_the_checkpoint(tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = _teacher(tmp_path, "train.tracking.backend=mlflow", f"train.tracking.tracking_uri={uri}",
                   "train.tracking.experiment=unit", "train.tracking.tags.team=iaa")
    stage = cfg.model_dump(mode="json")
    other_rank = start_worker_run(cfg.train.tracking, stage, cfg.output, rank=1)
    other_rank.log(1, {"loss": 1.0})
    other_rank.finish(None)
    assert not (tmp_path / "mlruns").exists()  # only rank 0 tracks

    run = start_worker_run(cfg.train.tracking, stage, cfg.output, rank=0, resumed_from=2)
    run.log(3, {"loss": 0.5, "lr": 1e-3, "epoch": 0, "note": "not a number"})
    run.log(4, {"loss": 0.25, "lr": 5e-4, "epoch": 1, "val_srcc": 0.75})
    run.finish(str(tmp_path / "teacher" / "train" / "checkpoint_2"))
    assert mlflow.active_run() is None

    [logged] = _runs(uri, "unit")
    assert logged.info.status == "FINISHED" and logged.info.run_name == "teacher"  # the output folder's name
    params = logged.data.params
    assert params == {key: str(value) for key, value in flatten(stage).items()}
    assert params["train.lr"] == str(cfg.train.lr) and params["encoder.name"] == "test_vit"
    assert params["train.tracking.tags.team"] == "iaa" and params["labels.format"] == "ava"
    tags = logged.data.tags
    assert tags["team"] == "iaa" and tags["cskd.output"] == cfg.output and tags["cskd.resumed_from_step"] == "2"
    assert tags["cskd.checkpoint"] == str(tmp_path / "teacher" / "train" / "checkpoint_2")
    client = MlflowClient(uri)
    history = {name: [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, name)]
               for name in ("loss", "lr", "epoch", "val_srcc")}
    assert history == {"loss": [(3, 0.5), (4, 0.25)], "lr": [(3, 1e-3), (4, 5e-4)], "epoch": [(3, 0.0), (4, 1.0)],
                       "val_srcc": [(4, 0.75)]}
    assert "note" not in logged.data.metrics


def test_backend_none_tracks_nothing_and_flatten_spells_keys_like_set(tmp_path: Path) -> None:
    cfg = _teacher(tmp_path)
    assert cfg.train.tracking.backend == "none"
    run = start_worker_run(cfg.train.tracking, cfg.model_dump(mode="json"), cfg.output, rank=0)
    run.log(1, {"loss": 1.0})
    run.finish("anything")
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "mlruns").exists()
    assert flatten({"train": {"lr": 0.1, "tracking": {"tags": {}}}, "input": ["a"]}) == {"train.lr": 0.1,
                                                                                          "input": ["a"]}


def test_tracking_uri_defaults_and_checkpoint_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    on = TrackingConfig(backend="mlflow")
    assert mlflow_uri(on, str(tmp_path / "out")) == (tmp_path / "out" / "mlruns").as_uri()
    with pytest.raises(ConfigError, match=r"train\.tracking\.tracking_uri: needed for MLflow with output 's3://b/x'"):
        mlflow_uri(on, "s3://b/x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_uri(on, "s3://b/x") == "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    assert TrackingConfig(backend="mlflow", tracking_uri="runs/mlruns").tracking_uri == (
        tmp_path / "runs" / "mlruns").as_uri()  # Ray workers do not share this directory
    assert TrackingConfig(tracking_uri="databricks").tracking_uri == "databricks"
    s3 = SimpleNamespace(path="bucket/run/train/checkpoint_1", filesystem=SimpleNamespace(type_name="s3"))
    local = SimpleNamespace(path="/runs/t/train/checkpoint_1", filesystem=pafs.LocalFileSystem())
    assert checkpoint_uri(s3) == "s3://bucket/run/train/checkpoint_1"
    assert checkpoint_uri(local) == "/runs/t/train/checkpoint_1" and checkpoint_uri(None) is None


@pytest.mark.parametrize(("backend", "install"), [("mlflow", "pip install mlflow-skinny"),
                                                  ("wandb", "pip install wandb")])
def test_a_missing_backend_package_fails_when_the_config_loads(backend: str, install: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: find_spec and import both fail
    with pytest.raises(ConfigError, match=rf"train\.tracking\.backend: .*{backend} logging needs the {backend} "
                                          rf"package.*{install}.*valid backends: none, mlflow, wandb"):
        _teacher(tmp_path, f"train.tracking.backend={backend}")
    sweep = TuneConfig(stage="teacher", config=str(CONFIGS / "teacher.yaml"), output=str(tmp_path / "sweep"),
                       set=[f"train.tracking.backend={backend}"], search={"train.lr": {"choice": [0.01]}})
    from cskd_ray.stages.tune import plan_tune

    with pytest.raises(ConfigError, match=install):  # a sweep checks its base config before Ray starts
        plan_tune(sweep)
    assert _teacher(tmp_path).train.tracking.backend == "none"  # tracking off needs neither package


class _Trial:
    """What MLflowLoggerCallback reads from a Tune trial: its config and its name."""

    def __init__(self, name: str, config: dict) -> None:
        self.name, self.config = name, config

    def __str__(self) -> str:
        return self.name


def test_tune_callback_logs_one_run_per_trial_and_trials_do_not_log_twice(tmp_path: Path) -> None:
    import ray.cloudpickle
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    assert tune_callbacks(TrackingConfig(), str(tmp_path)) == []
    uri = (tmp_path / "mlruns").as_uri()
    tracking = TrackingConfig(backend="mlflow", tracking_uri=uri, experiment="sweep", tags={"team": "iaa"})
    [callback] = tune_callbacks(tracking, str(tmp_path / "sweep"))
    assert isinstance(callback, MLflowLoggerCallback)
    callback = ray.cloudpickle.loads(ray.cloudpickle.dumps(callback))  # Tune saves it with the sweep's state
    callback.setup()
    trial = _Trial("_run_trial_a1", {"train.lr": 0.01})
    callback.log_trial_start(trial)
    for iteration, srcc in enumerate((0.25, 0.5), start=1):
        callback.log_trial_result(iteration, trial, {"training_iteration": iteration, "val_srcc": srcc})
    callback.log_trial_end(trial)
    [logged] = _runs(uri, "sweep")
    assert logged.data.params == {"train.lr": "0.01"} and logged.info.status == "FINISHED"
    assert logged.data.tags["team"] == "iaa" and logged.data.tags["cskd.output"] == str(tmp_path / "sweep")
    assert logged.data.metrics["val_srcc"] == 0.5
    base = _teacher(tmp_path, "train.tracking.backend=mlflow", f"train.tracking.tracking_uri={uri}").model_dump(
        mode="json")
    trial_base = without_tracking(base)
    assert trial_base["train"]["tracking"]["backend"] == "none" and base["train"]["tracking"]["backend"] == "mlflow"
    assert {**trial_base, "train": {**trial_base["train"], "tracking": base["train"]["tracking"]}} == base


class _WandbRecorder:
    """Stands in for a W&B run (wandb is not a test dependency): records what the worker's run logs."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))

    def finish(self) -> None:
        self.finished = True


def test_wandb_worker_run_passes_project_group_mode_and_a_fresh_id_to_setup_wandb(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.air.integrations.wandb as ray_wandb

    calls, recorder = [], _WandbRecorder()
    monkeypatch.setattr(ray_wandb, "setup_wandb", lambda config, **kwargs: calls.append((config, kwargs)) or recorder)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_PROJECT_NAME", raising=False)
    tracking = TrackingConfig.model_construct(  # skips the installed-package check: wandb is not installed here
        **{**TrackingConfig().model_dump(), "backend": "wandb", "experiment": "sweep-1", "mode": "offline",
           "tags": {"team": "iaa"}})
    stage = {"train": {"lr": 0.01}, "output": str(tmp_path / "teacher")}
    run = start_worker_run(tracking, stage, str(tmp_path / "teacher"), rank=0, resumed_from=4)
    run.log(5, {"loss": 0.5, "epoch": 1, "note": "x"})
    run.finish(str(tmp_path / "teacher" / "train" / "checkpoint_5"))
    [(config, kwargs)] = calls
    assert config == {"train.lr": 0.01, "output": str(tmp_path / "teacher")}
    assert kwargs == {"rank_zero_only": False, "trial_id": None, "trial_name": "teacher", "group": "sweep-1",
                      "project": "cskd_ray", "mode": "offline", "resume": None, "tags": ["team=iaa"],
                      "dir": str(tmp_path / "teacher")}  # resume=None: Ray's default would resume an old run
    assert os.environ["WANDB_MODE"] == "offline"  # Ray skips its API-key check only through it
    assert recorder.logged == [(5, {"loss": 0.5, "epoch": 1.0})] and recorder.finished
    assert recorder.summary == {"cskd.output": str(tmp_path / "teacher"), "cskd.resumed_from_step": 4,
                                "cskd.checkpoint": str(tmp_path / "teacher" / "train" / "checkpoint_5")}
