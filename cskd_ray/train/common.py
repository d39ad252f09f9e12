"""The per-worker training loop shared by every Ray Train stage, and the trainer set-up around it.

A stage supplies a *task*: an ``nn.Module`` whose ``forward(batch)`` returns a dict of named losses
with the total under ``"loss"`` (plus any metrics to report), and whose ``trainable_parameters()``
lists what the optimiser updates. The loop does the rest, in order: restore, lr, forward, backward,
clip, step (:mod:`cskd_ray.train.step`), report, checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cskd_ray.io import storage
from cskd_ray.train.checkpoints import (
    TrainState,
    latest_valid_checkpoint,
    load_checkpoint,
    repair_run_snapshot,
    save_checkpoint,
    unwrap,
    write_manifest,
)
from cskd_ray.train.config import TrainerConfig
from cskd_ray.train.history import TrainingHistory
from cskd_ray.train.launch import TaskFactory, train_worker_loop
from cskd_ray.train.placement import forget_placement_group, register_placement_group
from cskd_ray.train.step import global_metrics, make_optimizer, train_step
from cskd_ray.train.tracking import start_worker_run
from cskd_ray.train.validation import ValidationBatches

# Ray Train callbacks that build_trainer adds to every trainer built in the current context (a trial of a
# Tune sweep adds Tune's TuneReportCallback this way, so the stages need no Tune-specific argument).
_RUN_CALLBACKS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("cskd_run_callbacks", default=())


@contextlib.contextmanager
def extra_run_callbacks(callbacks: list[Any]) -> Iterator[None]:
    """Within this block, trainers made by :func:`build_trainer` also run ``callbacks`` (``ray.train.UserCallback``).

    The setting is per thread / task context (a ``ContextVar``), so concurrent trials in one process do not
    see each other's callbacks.
    """
    token = _RUN_CALLBACKS.set((*_RUN_CALLBACKS.get(), *callbacks))
    try:
        yield
    finally:
        _RUN_CALLBACKS.reset(token)


def _checkpoint(state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                config: dict, validation: ValidationBatches | None, history: TrainingHistory) -> None:
    """Validate (when the stage has a ``val`` dataset), then save and report a checkpoint from rank 0.

    The history (with the validation metrics) is saved inside the checkpoint and, once the checkpoint is
    reported, published to the stage's output (``metrics.jsonl``, TensorBoard events).
    """
    import ray.train

    task = unwrap(model)
    if validation is not None:
        task.eval()
        with torch.no_grad():
            metrics = task.validate(validation)
        state.metrics = {**(state.metrics or {}), **metrics}
        history.log(state.step, state.epoch, metrics)
        task.train()
    payload = {**(state.metrics or {}), "step": state.step, "epoch": state.epoch}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(directory, model, optimizer, scheduler, state, config)
            history.save(directory)
            write_manifest(directory)  # last: checksums of everything in the checkpoint
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(payload, checkpoint=checkpoint)
    history.publish()


def run_worker_loop(loop_config: dict) -> None:
    """The Ray Train worker loop: restore, then train ``total_steps`` steps on the ``train`` shard.

    Called by :func:`cskd_ray.train.launch.train_worker_loop`, the light entry point Ray pickles.

    ``loop_config`` holds ``task_factory`` (a picklable callable building the task from the stage
    config), ``stage`` (the stage config as a dict), ``trainer`` (:class:`TrainerConfig` as a dict),
    ``steps_per_epoch`` (optimizer steps per epoch, the same on every rank) and ``validate`` (whether a
    ``val`` dataset is given; the task's ``validate(batches)`` then adds metrics to every checkpoint).
    """
    import ray.train
    import ray.train.torch

    cfg = TrainerConfig(**loop_config["trainer"])
    steps_per_epoch, world = loop_config["steps_per_epoch"], ray.train.get_context().get_world_size()
    total_steps = cfg.epochs * steps_per_epoch
    stop_at = min(total_steps, cfg.max_steps or total_steps)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    task = loop_config["task_factory"](loop_config["stage"])
    model = ray.train.torch.prepare_model(task)
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    device, rank = ray.train.torch.get_device(), ray.train.get_context().get_world_rank()
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and cfg.precision in ("auto", "fp16"))
    state = TrainState()
    history = TrainingHistory(loop_config.get("output"), enabled=ray.train.get_context().get_world_rank() == 0)
    with latest_valid_checkpoint(_resume_point(loop_config)) as directory:  # verified; damaged → the previous one
        if directory is not None:
            state = load_checkpoint(directory, model, optimizer, scheduler)
            history.restore(directory, state.step)
    shard = ray.train.get_dataset_shard("train")
    validation = ValidationBatches(ray.train.get_dataset_shard("val"), cfg.batch_size, device,
                                   cfg.val_cache_mb << 20) if loop_config.get("validate") else None
    output = loop_config.get("output")
    group = register_placement_group(output) if rank == 0 and output else None  # freed by Tune if stopped early
    tracker = start_worker_run(cfg.tracking, loop_config["stage"], loop_config.get("output"), rank,
                               resumed_from=state.step)
    while state.step < stop_at:
        # Batches of this epoch done before a restart. The epoch's order is a function of (seed, epoch) when the
        # ingest keeps Ray Data's row order (train.deterministic), so these are exactly the batches already seen.
        skip = state.step - state.epoch * steps_per_epoch
        if hasattr(task, "set_epoch"):
            task.set_epoch(state.epoch)  # epoch-indexed random draws (the distill task's augmentations)
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size // world, drop_last=True, device=device,
            local_shuffle_buffer_size=4 * cfg.batch_size if cfg.shuffle else None,
            local_shuffle_seed=cfg.seed + state.epoch if cfg.shuffle else None,
        )
        for index, batch in enumerate(batches):
            if index < skip:
                continue
            if index >= steps_per_epoch or state.step >= stop_at:
                continue  # every rank drains its shard, so all ranks stay in step
            outputs = train_step(model, batch, optimizer, scheduler, scaler, params, cfg, state.step, rank)
            state.step += 1
            state.metrics = {**global_metrics(outputs), "lr": scheduler.get_last_lr()[0]}
            history.log(state.step, state.epoch, state.metrics)
            last = state.step == stop_at
            epoch_end = index + 1 == steps_per_epoch and validation is not None
            if state.step % cfg.checkpoint_every == 0 or last or epoch_end:
                _checkpoint(state, model, optimizer, scheduler, loop_config["stage"], validation, history)
                tracker.log(state.step, {**state.metrics, "epoch": state.epoch})  # rank 0's report
        state.epoch += 1
    history.close()
    forget_placement_group(output, group)
    tracker.finish(ray.train.get_checkpoint())  # the last reported checkpoint


def _resume_point(loop_config: dict) -> Any:
    """The checkpoint Ray hands this worker; else the one named when Ray's registry was found damaged; else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        fs, path = storage.resolve(loop_config["resume_from"])
        checkpoint = ray.train.Checkpoint(path, fs)
    return checkpoint


def build_trainer(stage: str, stage_config: dict, trainer: TrainerConfig, task_factory: TaskFactory,
                  steps_per_epoch: int, dataset: Any, output: str, val_dataset: Any = None,
                  best_metric: str | None = None) -> Any:
    """A ``TorchTrainer`` running :func:`run_worker_loop`; checkpoints go to ``output/train``.

    Running it again with the same ``output`` resumes from the latest complete checkpoint. With a
    ``val_dataset`` every worker sees all of it (it is not split) and each checkpoint carries the
    validation metrics; ``best_metric`` (higher is better) decides which checkpoints are kept.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = trainer.use_gpu if trainer.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    fs, path = storage.resolve(output)
    resume_from = repair_run_snapshot(storage.join(output, "train"))
    return TorchTrainer(
        train_worker_loop,  # a light module: the controller unpickles it without importing torch models
        train_loop_config={"task_factory": task_factory, "stage": stage_config, "trainer": trainer.model_dump(),
                           "steps_per_epoch": steps_per_epoch, "validate": val_dataset is not None, "output": output,
                           "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=trainer.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": trainer.cpus_per_worker},
                                     placement_strategy=trainer.placement_strategy),
        run_config=RunConfig(
            name="train", storage_path=path, storage_filesystem=fs if storage.is_remote(output) else None,
            checkpoint_config=CheckpointConfig(
                num_to_keep=trainer.keep_checkpoints,
                checkpoint_score_attribute=best_metric,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=trainer.max_failures),
            callbacks=list(_RUN_CALLBACKS.get()) or None,
        ),
        datasets={"train": dataset, **({"val": val_dataset} if val_dataset is not None else {})},
        dataset_config=_data_config(DataConfig, trainer.deterministic, split=trainer.num_workers > 1),
    )


def _data_config(data_config_cls: Any, deterministic: bool, split: bool = True) -> Any:
    """Ingest options: ``train`` is split between workers; one worker reads it whole (no split coordinator)."""
    options = data_config_cls.default_ingest_options()
    options.preserve_order = deterministic
    return data_config_cls(datasets_to_split=["train"] if split else [], execution_options=options)
