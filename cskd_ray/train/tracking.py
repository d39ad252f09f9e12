"""Optional experiment tracking of the training stages and Tune sweeps: MLflow or Weights & Biases.

Off by default (``train.tracking.backend: none``). Everything goes through Ray's own integrations
(``ray.air.integrations.mlflow`` / ``ray.air.integrations.wandb``):

* a training stage (align, teacher, distill): rank 0 of the Ray Train run starts one run
  (``setup_mlflow`` / ``setup_wandb``; the other ranks log nothing) whose params are the resolved stage config
  flattened to dotted keys (``train.lr``, ``encoder.name``); at every checkpoint report it logs the metrics the
  loop reports (loss terms, ``lr``, ``epoch`` and the ``val_*`` metrics) at the optimizer step, and at the end
  it records the last checkpoint's URI (MLflow tag / W&B summary ``cskd.checkpoint``) and closes the run. Each
  training run is one tracked run: a resumed stage opens a new one tagged ``cskd.resumed_from_step`` (the run
  of a worker group that failed is left open, as ``RUNNING`` in MLflow);
* a Tune sweep whose base stage config turns tracking on: Tune's ``MLflowLoggerCallback`` /
  ``WandbLoggerCallback`` log one run per trial (the sampled values as params, every report as metrics), and
  the trials' own training runs do not log, so a trial is not tracked twice (:func:`tune_callbacks`,
  :func:`without_tracking`).

The backend package is optional (``pip install 'cskd_ray[tracking]'``); a config that asks for a backend whose
package is missing fails when it is loaded, before Ray starts.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cskd_ray.config import ConfigError

BACKENDS = ("none", "mlflow", "wandb")
PACKAGES = {"mlflow": ("mlflow", "pip install mlflow-skinny"), "wandb": ("wandb", "pip install wandb")}
DEFAULT_EXPERIMENT = "cskd_ray"
TAG_OUTPUT, TAG_RESUMED, TAG_CHECKPOINT = "cskd.output", "cskd.resumed_from_step", "cskd.checkpoint"


def require_backend(backend: str) -> str:
    """Check that ``backend``'s package can be imported; return ``backend``.

    Raises:
        ValueError: The package is missing; the message says what to install and lists the valid backends.
    """
    if backend in PACKAGES:
        module, install = PACKAGES[backend]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{backend} logging needs the {module} package, which is not installed: {install} (or "
                             f"pip install 'cskd_ray[tracking]'); valid backends: {', '.join(BACKENDS)}")
    return backend


class TrackingConfig(BaseModel):
    """Experiment tracking of a training run (``train.tracking``): MLflow or Weights & Biases, off by default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["none", "mlflow", "wandb"] = Field(
        "none", description="none: no tracking; mlflow or wandb: log params, metrics and the checkpoint URI (needs "
        "pip install 'cskd_ray[tracking]').")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, databricks, sqlite:///..., file:///abs/mlruns; a "
        "plain path is a file store); null: $MLFLOW_TRACKING_URI, else the file store OUTPUT/mlruns of a local output.")
    experiment: str | None = Field(
        None, description="MLflow experiment (created when missing) or W&B group; null: cskd_ray for MLflow.")
    run_name: str | None = Field(None, description="Name of the run; null: the name of the stage's output folder.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on every run (W&B: as key=value).")
    project: str | None = Field(None, description="W&B project; null: $WANDB_PROJECT_NAME, else cskd_ray.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="W&B mode; offline writes the run locally for a later `wandb sync`.")

    @field_validator("backend")
    @classmethod
    def _package_installed(cls, value: str) -> str:
        return require_backend(value)

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_file_store(cls, value: str | None) -> str | None:
        """A plain path becomes an absolute ``file://`` URI: Ray workers do not share the driver's directory."""
        if value is None or ":" in value or value == "databricks":
            return value
        return Path(value).expanduser().resolve().as_uri()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections → dotted keys, as ``--set`` spells them: ``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}``.

    An empty section has no key (as in Ray's own ``flatten_dict``, which the integrations apply to params).
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def without_tracking(stage_config: dict) -> dict:
    """``stage_config`` (a dumped stage config) with ``train.tracking`` turned off."""
    return {**stage_config, "train": {**stage_config["train"], "tracking": TrackingConfig().model_dump()}}


def mlflow_uri(tracking: TrackingConfig, output: str | None) -> str:
    """The MLflow tracking URI: the configured one, else ``$MLFLOW_TRACKING_URI``, else ``OUTPUT/mlruns``.

    Raises:
        ConfigError: Nothing is configured and the output is not a local folder (a file store cannot live on S3).
    """
    uri = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if output is None or "://" in output:
        raise ConfigError(f"train.tracking.tracking_uri: needed for MLflow with output {output!r} (a file store must "
                         "be a local folder); give an MLflow server URI or set MLFLOW_TRACKING_URI")
    return Path(output, "mlruns").resolve().as_uri()


def _allow_file_store(uri: str) -> None:
    """MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a configured one is asked for."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _wandb_project(tracking: TrackingConfig) -> str:
    return tracking.project or os.environ.get("WANDB_PROJECT_NAME") or DEFAULT_EXPERIMENT


def _wandb_mode(tracking: TrackingConfig) -> None:
    """Ray reads the mode from ``WANDB_MODE`` to skip its API-key check offline, so set it in this process."""
    if tracking.mode != "online":
        os.environ["WANDB_MODE"] = tracking.mode


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def checkpoint_uri(checkpoint: Any) -> str | None:
    """The URI of a ``ray.train.Checkpoint`` (``s3://`` for S3 storage), a URI given as a string, or None."""
    if checkpoint is None or isinstance(checkpoint, str):
        return checkpoint
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(getattr(checkpoint.filesystem, "type_name", "local"), "")
    return scheme + checkpoint.path


class WorkerRun:
    """A tracked training run as the worker loop sees it; this base class tracks nothing (ranks > 0, backend none)."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log the numeric ``metrics`` of one report at optimizer step ``step``."""

    def finish(self, checkpoint: Any = None) -> None:
        """Record the last checkpoint (a ``ray.train.Checkpoint`` or a URI) and close the run."""


class _MlflowRun(WorkerRun):
    def __init__(self, mlflow: Any) -> None:
        self.mlflow = mlflow  # the mlflow module, its run active (what setup_mlflow returns)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(metrics), step=step)

    def finish(self, checkpoint: Any = None) -> None:
        if (uri := checkpoint_uri(checkpoint)) is not None:
            self.mlflow.set_tag(TAG_CHECKPOINT, uri)
        self.mlflow.end_run()


class _WandbRun(WorkerRun):
    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(_numbers(metrics), step=step)

    def finish(self, checkpoint: Any = None) -> None:
        if (uri := checkpoint_uri(checkpoint)) is not None:
            self.run.summary[TAG_CHECKPOINT] = uri
        self.run.finish()


def start_worker_run(tracking: TrackingConfig, stage_config: Mapping[str, Any], output: str | None, rank: int,
                     resumed_from: int = 0) -> WorkerRun:
    """Start the tracked run of a training run, on rank 0 only (called by the shared worker loop).

    Args:
        tracking: The stage's ``train.tracking``.
        stage_config: The resolved stage config (a dict); logged flattened as the run's params.
        output: The stage's output URI (tagged; the default run name and MLflow file store derive from it).
        rank: This worker's world rank; ranks other than 0 get a run that logs nothing.
        resumed_from: The step training resumes from (0 for a fresh run), tagged when > 0.

    Returns:
        The run: ``log(step, metrics)`` at each report, ``finish(checkpoint)`` at the end.
    """
    if tracking.backend == "none" or rank != 0:
        return WorkerRun()
    params = flatten(stage_config)
    name = tracking.run_name or (posixpath.basename(output.rstrip("/")) if output else None)
    tags = {**tracking.tags, TAG_OUTPUT: output or "", **({TAG_RESUMED: str(resumed_from)} if resumed_from else {})}
    if tracking.backend == "mlflow":
        from ray.air.integrations.mlflow import setup_mlflow

        uri = mlflow_uri(tracking, output)
        _allow_file_store(uri)
        mlflow = setup_mlflow(params, tracking_uri=uri, experiment_name=tracking.experiment or DEFAULT_EXPERIMENT,
                              run_name=name, create_experiment_if_not_exists=True, tags=tags, rank_zero_only=False)
        return _MlflowRun(mlflow)
    from ray.air.integrations.wandb import setup_wandb

    _wandb_mode(tracking)
    local = output if output and "://" not in output else None
    if local:
        Path(local).mkdir(parents=True, exist_ok=True)  # W&B writes its files under OUTPUT/wandb
    run = setup_wandb(params, rank_zero_only=False, trial_id=None, trial_name=name, group=tracking.experiment,
                      project=_wandb_project(tracking), mode=tracking.mode, resume=None,
                      tags=[f"{k}={v}" for k, v in tracking.tags.items()], **({"dir": local} if local else {}))
    run.summary.update({TAG_OUTPUT: output or "", TAG_RESUMED: resumed_from})
    return _WandbRun(run)


def tune_callbacks(tracking: TrackingConfig, output: str) -> list[Any]:
    """Tune logger callbacks for a sweep writing to ``output``: one MLflow / W&B run per trial (none when off)."""
    if tracking.backend == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = mlflow_uri(tracking, output)
        _allow_file_store(uri)
        return [MLflowLoggerCallback(uri, experiment_name=tracking.experiment or DEFAULT_EXPERIMENT,
                                     tags={**tracking.tags, TAG_OUTPUT: output})]
    if tracking.backend == "wandb":
        from ray.air.integrations.wandb import WandbLoggerCallback

        _wandb_mode(tracking)
        return [WandbLoggerCallback(project=_wandb_project(tracking), group=tracking.experiment, mode=tracking.mode,
                                    tags=[f"{k}={v}" for k, v in tracking.tags.items()])]
    return []

