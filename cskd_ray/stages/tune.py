"""Ray Tune sweeps of a training stage (align, teacher or distill) over any of its config keys.

Each trial is the Train V2 pattern for tuning a ``TorchTrainer``: a small driver function, holding only a
tiny custom resource, builds the trial's stage config (base config + sampled values, ``output`` =
``EXPERIMENT/trials/<trial_id>``) and runs the real stage; the stage's trainer carries Tune's
``TuneReportCallback`` (added through :func:`cskd_ray.train.common.extra_run_callbacks`), so every
checkpoint report (validation ``val_srcc`` for teacher/distill, ``cosine`` for align) reaches Tune and its
scheduler. ASHA (asynchronous successive halving, arXiv 1810.05934) promotes a trial past rung
r_k = grace_period · η^k reports only while its metric is in the top 1/η of the trials recorded at that
rung (η = ``reduction_factor``); the others stop early.

Outputs in the experiment folder: ``trials.parquet`` and ``trials.csv`` (one row per trial: sampled
values, best and last metric, reports, epochs, steps, stopped early, status, error), ``best_config.yaml``
(the best trial's full stage config, ready for ``cskd-ray <stage>``), ``tune_config.yaml`` (this sweep)
and ``tune/`` (Tune's state, which ``--resume`` restores without rerunning finished trials).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from cskd_ray.config import ConfigError, StrictModel, dump_config
from cskd_ray.io import storage
from cskd_ray.stages.tune_results import TRIALS_DIR, TuneResult, format_top, trial_rows, write_outputs
from cskd_ray.stages.tune_space import (
    SEARCH_KINDS,
    SchedulerConfig,
    SearchDimension,
    TunePlan,
    param_space,
    plan_tune,
    trial_config,
)
from cskd_ray.train.placement import TRIAL_DRIVER_RESOURCE
from cskd_ray.train.tracking import TrackingConfig, tune_callbacks, without_tracking

__all__ = ["TuneConfig", "TunePlan", "TuneResult", "plan_tune", "run"]
EXPERIMENT_DIR = "tune"


class TuneConfig(StrictModel):
    """A Ray Tune sweep: each trial runs ``stage`` with ``config`` + ``set`` + values sampled from ``search``.

    Trials write under ``output/trials/<trial_id>``; the sweep writes ``trials.parquet``/``trials.csv`` and
    ``best_config.yaml`` to ``output`` and keeps Tune's own state in ``output/tune`` (for ``--resume``).
    """

    stage: Literal["align", "teacher", "distill"] = Field(description="The training stage every trial runs.")
    config: str = Field(description="The stage's YAML config every trial starts from.")
    set: list[str] = Field(default_factory=list, description="Overrides of `config`, as for --set key=value.")
    input: list[str] | None = Field(None, description="Overrides the stage's input (as its --input does).")
    output: str = Field(description="Experiment folder (local or s3://).")
    search: dict[str, SearchDimension] = Field(
        min_length=1, description="Dotted stage-config key → domain, e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}.")
    metric: str | None = Field(None, description="Reported metric to rank by; null: cosine for align, else val_srcc.")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or a lower `metric` is better.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="When trials stop.")
    num_samples: int = Field(4, ge=1, description="Samples of the space (each grid point is sampled this often).")
    max_concurrent: int | None = Field(
        None, ge=1, description="null: cluster CPUs / (workers × cpus_per_worker + data_cpus_per_trial), and GPUs.")
    data_cpus_per_trial: float = Field(0.5, ge=0, description="CPUs left per trial for its Ray Data decode tasks.")
    seed: int | None = Field(0, description="Seed of the sampled values; null: a different sweep every time.")
    top_k: int = Field(5, ge=1, description="Trials printed at the end.")

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("search", mode="before")
    @classmethod
    def _flatten_search(cls, value: Any) -> Any:
        """Nested sections (``train: {lr: {choice: ...}}``, or ``--set search.train.lr.choice=...``) → dotted keys."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, spec in value.items():
            if isinstance(spec, dict) and spec and not set(spec) & set(SEARCH_KINDS):
                flat.update({f"{key}.{sub}": inner for sub, inner in cls._flatten_search(spec).items()})
            else:
                flat[str(key)] = spec
        return flat


def run_stage(stage: str, cfg: StrictModel) -> Any:
    """Run one training stage with its config: the stage module's own ``run`` (imported here, in the trial)."""
    if stage == "align":
        from cskd_ray.stages.align import run
    elif stage == "teacher":
        from cskd_ray.stages.teacher import run
    else:
        from cskd_ray.stages.distill import run
    return run(cfg)


def _run_trial(params: dict, stage: str, base: dict, experiment: str) -> None:
    """Tune trial driver: the stage config for the sampled ``params``, run with Tune's report callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cskd_ray.train.common import extra_run_callbacks

    output = storage.join(experiment, TRIALS_DIR, tune.get_context().get_trial_id())
    cfg = trial_config(stage, base, params, output)
    storage.write_text_once(storage.join(output, "resolved_config.yaml"), dump_config(cfg), overwrite=True)
    with extra_run_callbacks([TuneReportCallback()]):
        run_stage(stage, cfg)


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def max_concurrent_trials(plan: TunePlan) -> int:
    """Trials that fit at once: ⌊CPUs / (workers × cpus_per_worker + data_cpus_per_trial)⌋, also bounded by GPUs."""
    import ray

    if plan.cfg.max_concurrent:
        return plan.cfg.max_concurrent
    resources = ray.cluster_resources()
    cpus, workers = plan.trial_resources
    fit = math.floor(resources.get("CPU", 1.0) / (cpus + plan.cfg.data_cpus_per_trial) + 1e-9)
    use_gpu = plan.base["train"]["use_gpu"]
    if use_gpu or (use_gpu is None and resources.get("GPU", 0) > 0):
        fit = min(fit, math.floor(resources.get("GPU", 0) / workers + 1e-9))
    return max(1, fit)


def driver_resources() -> dict[str, float]:
    """The trial driver's resources: a sliver of the custom resource when the cluster declares it, else of a CPU."""
    import ray

    return {TRIAL_DRIVER_RESOURCE: 0.01} if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE) else {"CPU": 0.01}


def _check_same_sweep(cfg: TuneConfig) -> None:
    """A resumed sweep must be the one that was started (Tune keeps its trials and search space).

    Raises:
        ConfigError: Naming the keys that differ from the saved ``tune_config.yaml``.
    """
    uri = storage.join(cfg.output, "tune_config.yaml")
    if not storage.exists(uri):
        return
    saved, current = yaml.safe_load(storage.read_text(uri)), cfg.model_dump(mode="json")
    changed = [key for key in ("stage", "config", "set", "input", "search", "metric", "mode", "scheduler",
                               "num_samples", "seed") if saved.get(key) != current.get(key)]
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the sweep in {cfg.output} ({uri}); resume it "
                          "with its own config, or start a new sweep with another --output")


def check(cfg: TuneConfig) -> None:
    """Before Ray starts: the base stage config and every search key and value (see :func:`plan_tune`)."""
    plan_tune(cfg)


def run(cfg: TuneConfig, resume: bool = False, callbacks: list[Any] | None = None,
             say: Callable[[str], None] = print) -> TuneResult:
    """Run (or, with ``resume``, continue) the sweep; write the trials table and the best config.

    Args:
        cfg: The sweep.
        resume: Continue the sweep in ``cfg.output`` (finished trials are kept, unfinished and errored
            ones run again from their latest checkpoint); without it an existing sweep there is an error.
        callbacks: Extra ``ray.tune.Callback`` objects (progress hooks).
        say: Where progress lines go.

    Raises:
        ConfigError: Bad config (see :func:`plan_tune`), or a sweep already in ``cfg.output`` without ``resume``.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cskd_ray.stages.tune_release import ReleaseStoppedTrials

    start = time.perf_counter()
    plan = plan_tune(cfg)
    tracking = TrackingConfig(**plan.base["train"]["tracking"])  # the base stage config's train.tracking
    fs, root = storage.resolve(cfg.output)
    fs = fs if storage.is_remote(cfg.output) else None
    experiment = f"{root}/{EXPERIMENT_DIR}"
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, stage=cfg.stage, base=without_tracking(plan.base), experiment=cfg.output),
        driver_resources())  # tracked by Tune's logger callback, a trial's training run does not log itself
    exists = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if exists and not resume:
        raise ConfigError(f"output {cfg.output}: already holds a sweep; pass --resume to continue it, or choose "
                          "another --output")
    if exists:
        _check_same_sweep(cfg)
    storage.write_text_once(storage.join(cfg.output, "tune_config.yaml"), dump_config(cfg), overwrite=True)
    if exists:
        say(f"tune: resuming the sweep in {cfg.output} (finished trials are kept)")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        concurrent = max_concurrent_trials(plan)
        say(f"tune: {cfg.stage} sweep over {', '.join(cfg.search)}; {cfg.num_samples} sample(s), up to {concurrent} "
            f"trial(s) at once, scheduler {cfg.scheduler.kind}, metric {plan.metric} ({cfg.mode})")
        sched = cfg.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sched.max_t, grace_period=sched.grace_period,
                                  reduction_factor=sched.reduction_factor) if sched.kind == "asha" else FIFOScheduler()
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg.search),
            tune_config=tune.TuneConfig(
                metric=plan.metric, mode=cfg.mode, scheduler=scheduler, num_samples=cfg.num_samples,
                search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.seed),
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=EXPERIMENT_DIR, storage_path=root, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=0), callbacks=[
                                          *(callbacks or []), *tune_callbacks(tracking, cfg.output),
                                          ReleaseStoppedTrials(cfg.output)],  # frees ASHA-stopped trials' CPUs
                                      verbose=1))
    grid = tuner.fit()
    rows = trial_rows(grid, plan)
    best = rows[0] if rows and not math.isnan(rows[0][plan.metric]) else None
    best_path = write_outputs(plan, rows, best)
    result = TuneResult(cfg.output, rows, plan.metric, best, best_path, exists, time.perf_counter() - start)
    say(format_top(result, cfg.top_k))
    return result


