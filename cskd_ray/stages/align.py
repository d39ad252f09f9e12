"""Phase 1, align: a timm encoder + projection head trained on Ray Train to match cached CLIP features.

Input: a feature cache written by ``features`` (``input``); output: ``OUTPUT/train`` (checkpoints; a rerun
with the same output resumes from the latest) and ``OUTPUT/model`` (the aligned encoder + projection,
``model.safetensors`` + ``model.json``), which ``teacher`` and ``distill`` take as ``aligned``. The task
object, its losses and the training dataset are in :mod:`cskd_ray.train.align`; the worker loop is the
shared one (:mod:`cskd_ray.train.common`). Importing this module is light (its config and checks run before
torch loads); :func:`run` imports the training stack.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from cskd_ray.config import ConfigError, StrictModel, single_input
from cskd_ray.io import storage
from cskd_ray.io.decode import DEFAULT_MAX_PIXELS
from cskd_ray.io.feature_cache import FeatureCache
from cskd_ray.io.preflight import check_paths
from cskd_ray.train.config import (
    DECODE_BATCH_DESCRIPTION,
    MAX_PIXELS_DESCRIPTION,
    TRAIN_DESCRIPTION,
    EncoderConfig,
    TrainerConfig,
    check_batch,
    check_encoder,
)
from cskd_ray.train.launch import TaskFactory


class AlignConfig(StrictModel):
    """Phase 1: align a timm encoder + projection to cached CLIP features of unlabeled images."""

    input: str = Field(description="Feature cache URI written by the features stage.")
    output: str = Field(description="Run folder: checkpoints under train/, the aligned model under model/.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="The student encoder to align.")
    loss: Literal["cosine", "mse", "smooth_l1_tokens"] = Field(
        "cosine", description="Alignment loss (cskd_ray.losses); smooth_l1_tokens needs a cache written with "
        "tokens: true and a ViT encoder whose token grid matches CLIP's.")
    token_beta: float = Field(2.0, gt=0, description="β of smooth_l1_tokens.")
    train: TrainerConfig = Field(default_factory=TrainerConfig, description=TRAIN_DESCRIPTION)
    decode_batch_size: int = Field(32, ge=1, description=DECODE_BATCH_DESCRIPTION)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=MAX_PIXELS_DESCRIPTION)

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return single_input(value)


def check(cfg: AlignConfig) -> None:
    """Before Ray starts: paths, the feature cache, the encoder name and the batch split (nothing is read)."""
    check_paths(cfg)
    cache = FeatureCache(cfg.input)
    if cache.read_meta() is None or not cache.shards():
        raise ConfigError(f"input {cfg.input}: not a feature cache (no _meta.json or shards); run `features` first")
    check_encoder(cfg)
    check_batch(cfg)


@dataclass
class AlignResult:
    """What an align run did."""

    output: str
    steps: int
    epochs: int
    rows: int
    metrics: dict
    seconds: float
    images_per_s: float


def run(cfg: AlignConfig) -> AlignResult:
    """Train (or resume) the alignment of ``cfg.encoder`` to the CLIP features at ``cfg.input``.

    Checkpoints go to ``cfg.output/train`` (a rerun with the same output resumes from the latest one);
    the aligned model is written to ``cfg.output/model`` (``model.safetensors`` + ``model.json``).
    """
    from safetensors.torch import load_file
    from safetensors.torch import save as save_safetensors

    from cskd_ray.models.registry import create_encoder
    from cskd_ray.train.align import MODEL_DIR, check_token_grids, training_dataset
    from cskd_ray.train.checkpoints import MODEL_FILE, STATE_FILE
    from cskd_ray.train.common import build_trainer

    start = time.perf_counter()
    meta = FeatureCache(cfg.input).read_meta() or {}
    probe = create_encoder(cfg.encoder.name, cfg.encoder.pretrained,  # fails fast on a bad name, size or weights
                           image_size=cfg.encoder.image_size)
    packed = int(meta.get("pack_size") or 0)
    if 0 < packed < probe.preprocess.image_size:
        raise ConfigError(f"encoder: {cfg.encoder.name} takes {probe.preprocess.image_size} px images, but the cache "
                          f"{cfg.input} keeps them at pack_size {packed} (they would be upsampled); use a cache "
                          f"written with pack_size >= {probe.preprocess.image_size} (or 0), or encoder.image_size <= "
                          f"{packed}")
    tokens = cfg.loss == "smooth_l1_tokens"
    target_dim = check_token_grids(cfg, meta, probe.model) if tokens and meta else int(meta.get("dim", 0))
    dataset, rows = training_dataset(cfg.input, probe.preprocess, cfg.decode_batch_size, cfg.max_pixels,
                                     "tokens" if tokens else "feature", cfg.train.seed,
                                     reshuffle_each_epoch=cfg.train.shuffle and not cfg.train.deterministic)
    world, batch = cfg.train.num_workers, cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size {batch} must be a multiple of train.num_workers {world}")
    steps_per_epoch = (rows // world) // (batch // world)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {batch} is larger than the {rows} cached images")
    factory = TaskFactory("cskd_ray.train.align", "AlignTask", {"clip_dim": target_dim})
    trainer = build_trainer("align", cfg.model_dump(mode="json"), cfg.train, factory, steps_per_epoch, dataset,
                            cfg.output)
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        task_weights = load_file(str(Path(directory) / MODEL_FILE))
    weights = save_safetensors({k.removeprefix("student."): v for k, v in task_weights.items()
                                if k.startswith("student.")})
    model_dir = storage.join(cfg.output, MODEL_DIR)
    description = {"stage": "align", "encoder": cfg.encoder.model_dump(mode="json"), "clip_dim": target_dim,
                   "target": "tokens" if tokens else "pooled",
                   "clip": {k: meta.get(k) for k in ("model", "weights", "model_key", "random_weights")},
                   "preprocess": probe.preprocess.to_dict(), "step": state["step"], "metrics": state["metrics"],
                   "config": cfg.model_dump(mode="json")}
    storage.write_bytes_once(storage.join(model_dir, MODEL_FILE), weights, overwrite=True)
    storage.write_text_once(storage.join(model_dir, "model.json"), json.dumps(description, indent=2), overwrite=True)
    seconds = time.perf_counter() - start
    steps = int(state["step"])
    return AlignResult(cfg.output, steps, cfg.train.epochs, rows, state["metrics"], seconds,
                       steps * batch / seconds if seconds else 0.0)


def result_dict(result: AlignResult) -> dict:
    """JSON-ready summary."""
    return asdict(result)


def summary(result: AlignResult) -> str:
    """The lines ``cskd-ray align`` prints at the end."""
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items()) if isinstance(v, float))
    return (f"align: {result.steps} steps on {result.rows} cached images, {metrics}, "
            f"{result.images_per_s:.1f} img/s, {result.seconds:.1f} s\n"
            f"align: aligned model at {result.output}/model, checkpoints at {result.output}/train")
