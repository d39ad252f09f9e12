"""The config sections the training stages (align, teacher, distill) share, and their checks.

:class:`TrainerConfig` (``train:``) is read by the shared worker loop (:mod:`cskd_ray.train.common`);
:class:`EncoderConfig` (``encoder:``), :class:`ClassifiersConfig` (``classifiers:``), :class:`ExtraTeacherConfig`
and :class:`AugmentConfig` by the task objects. Each stage's own config (``cskd_ray.stages.align.AlignConfig``,
...) holds these sections.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cskd_ray.config import ConfigError, StrictModel
from cskd_ray.io import storage
from cskd_ray.train.tracking import TrackingConfig


class EncoderConfig(StrictModel):
    """A timm encoder plus the projection head that maps its pooled features into CLIP's space."""

    name: str = Field("test_vit", description="Any timm model name (see cskd-ray list-models encoders).")
    pretrained: bool | str = Field(False, description="false: random; true: timm's weights; or a checkpoint path/URI.")
    projection: Literal["linear", "mlp"] = Field(
        "linear", description="Projection head P into CLIP's space: linear, or a 2-layer MLP with GELU.")
    image_size: int | None = Field(
        None, ge=16, description="Input side in pixels; null: the model's own (timm's pretrained_cfg). Only for "
        "convolutional encoders (they take any size); a ViT's patch grid is fixed when it is built.")


TRAIN_DESCRIPTION = "How training runs: Ray Train workers, optimiser, checkpoints."
DECODE_BATCH_DESCRIPTION = "Images per decode task batch."
MAX_PIXELS_DESCRIPTION = "Larger images are refused (decompression bombs)."


class TrainerConfig(StrictModel):
    """How a Ray Train stage runs: workers, optimisation, checkpoints, failures."""

    num_workers: int = Field(1, ge=1, description="DDP workers.")
    use_gpu: bool | None = Field(None, description="null: use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(0.5, gt=0, description="0.5 leaves room for Ray Data on small machines.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (Ray placement group strategy); SPREAD: one per node "
        "where possible.")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many steps in total (the LR schedule still spans all epochs)."
    )
    batch_size: int = Field(32, ge=1, description="Global batch size (split evenly across workers).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup, then cosine decay to zero.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 turns clipping off.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU, fp32 on CPU.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (one is also kept at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best by val_srcc when the stage "
                                  "validates, else the latest.")
    max_failures: int = Field(0, ge=0, description="Worker failures to recover from (restart from checkpoint).")
    shuffle: bool = Field(True, description="Shuffle within a local buffer each epoch (seeded); align also reads "
                          "the feature cache's shards in a new order each epoch unless deterministic.")
    deterministic: bool = Field(
        False, description="Keep Ray Data's row order (slower ingest) so a run can be repeated bit for bit, and a "
        "resumed run sees exactly the batches it had not trained on yet."
    )
    seed: int = Field(0, description="Seed of weights initialisation, shuffling and sampling.")
    val_cache_mb: int = Field(
        512, ge=0, description="Keep the validation split's decoded batches in each worker's memory after the "
        "first check when they fit in this many MiB (later checks then read and decode nothing); 0: stream it "
        "at every check.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking of this run and of Tune sweeps over it "
        "(MLflow or W&B; off by default), see cskd_ray.train.tracking.")


class ExtraTeacherConfig(StrictModel):
    """One extra frozen feature teacher (multi-teacher distillation, arXiv 2206.00809)."""

    kind: Literal["clip", "timm"] = Field(description="clip: an open_clip image tower; timm: a timm model's "
                                                      "pooled features (e.g. an ImageNet classifier).")
    name: str = Field(description="open_clip model name (kind clip) or timm model name (kind timm).")
    pretrained: bool | str | None = Field(
        None, description="clip: open_clip tag, checkpoint path or s3:// URI; timm: true for timm's weights or a "
        "checkpoint path; null/false: random weights (only useful in tests).")
    weight: float = Field(1.0, ge=0, description="w_t, this teacher's weight in the loss.")
    projection: Literal["linear", "mlp"] = Field("linear", description="The student's head P_t into its space.")
    seed: int = Field(0, description="Seed of random CLIP weights.")


class ClassifierConfig(StrictModel):
    """One frozen object classifier of the combined teacher (Hou et al., arXiv 2206.00809)."""

    name: str = Field(description="timm model name of an object classifier (e.g. resnet50.a1_in1k).")
    pretrained: bool | str = Field(
        False, description="true: timm's weights; a checkpoint path or s3:// URI of the classifier; false: random "
        "weights (only useful in tests).")
    levels: list[int] | None = Field(
        None, description="Feature levels (timm out_indices; 0 the shallowest, -1 the deepest) pooled from this "
        "classifier; null: classifiers.levels.")


class ClassifiersConfig(StrictModel):
    """Hou et al.'s encoder: frozen classifiers, each level globally average-pooled, all concatenated.

    f(x) = concat_{b, l} GAP(F_{b,l}(x)); the teacher stage trains only its head (an MLP with ``hidden_dim``)
    on the labels (:mod:`cskd_ray.models.multilevel`).
    """

    backbones: list[ClassifierConfig] = Field(min_length=1, description="The frozen classifiers, in order.")
    levels: list[int] = Field([-3, -2, -1], min_length=1, description="Feature levels of every backbone without "
                              "its own `levels` (timm out_indices; negative: from the deepest).")
    image_size: int | None = Field(
        None, ge=16, description="Input side in pixels; null: the first backbone's own. Mean and std are the first "
        "backbone's; the others get the same pixels re-normalised with theirs.")


class AugmentConfig(StrictModel):
    """Strong augmentation of the consistency term (the teacher sees a flip only); see cskd_ray.train.augment."""

    crop_scale: float = Field(0.5, gt=0, le=1, description="Smallest crop area fraction of the random resized crop.")
    jitter: float = Field(0.4, ge=0, lt=1, description="Brightness/contrast/saturation factors in [1 − j, 1 + j].")
    noise: float = Field(0.03, ge=0, description="Std of added Gaussian noise (pixels in [0, 1]).")


def check_encoder(cfg: Any) -> None:
    """The encoder name must be a timm model (or ``aligned`` a model folder)."""
    aligned = getattr(cfg, "aligned", None)
    if aligned:
        if not storage.exists(storage.join(aligned, "model.json")):
            raise ConfigError(f"aligned {aligned}: not a model folder (no model.json); run `align` first and pass "
                              "its output/model")
        return
    import timm

    from cskd_ray.models.registry import list_encoders, unknown_model

    if not timm.is_model(cfg.encoder.name):
        raise ConfigError(f"encoder.name: {unknown_model('timm encoder', cfg.encoder.name, list_encoders())}")


def check_classifiers(cfg: ClassifiersConfig) -> None:
    """Every backbone is a timm model and its levels exist (built on the meta device: no weights, fast)."""
    from cskd_ray.models.multilevel import backbones_from, resolve_levels
    from cskd_ray.models.registry import UnknownModelError

    for index, backbone in enumerate(backbones_from(cfg.model_dump())):
        key = f"classifiers.backbones.{index}"
        try:
            resolve_levels(backbone.name, backbone.levels)
        except UnknownModelError as exc:
            raise ConfigError(f"{key}.name: {exc}") from exc
        except ValueError as exc:
            where = "levels" if cfg.backbones[index].levels is not None else "levels (from classifiers.levels)"
            raise ConfigError(f"{key}.{where}: {exc}") from exc


def check_batch(cfg: Any) -> None:
    """``train.batch_size`` splits evenly across ``train.num_workers``."""
    world, batch = cfg.train.num_workers, cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size {batch} must be a multiple of train.num_workers {world}")

