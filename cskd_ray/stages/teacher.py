"""Phase 2a, teacher: an aligned encoder + aesthetic head trained on labels with Ray Train, validated every epoch.

Losses (formulas in :mod:`cskd_ray.losses`): EMD_r with r = 2 for distribution labels (AVA, PARA), MSE on the
score normalised to [0, 1] for scalar labels (AADB, TAD66K, KonIQ, SPAQ). Each checkpoint carries validation
SRCC, PLCC, accuracy and EMD (r = 1); the one with the best ``val_srcc`` becomes ``OUTPUT/model``, which
``label``, ``evaluate``, ``score`` and ``export`` take as ``--model``. The task object and what the teacher
shares with distill are in :mod:`cskd_ray.train.supervise`. Importing this module is light (its config and
checks run before torch loads); :func:`run` imports the training stack.

With ``classifiers`` the stage trains Hou et al.'s combined teacher (arXiv 2206.00809): the encoder is frozen
object classifiers whose feature levels are globally pooled and concatenated (:mod:`cskd_ray.models.multilevel`),
and only the head, an MLP with ``hidden_dim`` (its hidden layer is the aesthetic feature), trains. The exported
folder holds the classifiers too, so every stage loads it like any teacher; distill's ``hou_teacher`` distils it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cskd_ray.config import ConfigError, StrictModel, single_input
from cskd_ray.io.decode import DEFAULT_MAX_PIXELS
from cskd_ray.io.labels import LabelsConfig, load_labels
from cskd_ray.io.preflight import check_exists, check_paths
from cskd_ray.train.config import (
    DECODE_BATCH_DESCRIPTION,
    MAX_PIXELS_DESCRIPTION,
    TRAIN_DESCRIPTION,
    ClassifiersConfig,
    EncoderConfig,
    TrainerConfig,
    check_batch,
    check_classifiers,
    check_encoder,
)
from cskd_ray.train.launch import TaskFactory


class TeacherConfig(StrictModel):
    """Phase 2a: an aligned encoder + aesthetic head trained on labels (the teacher)."""

    input: str = Field(description="Label file (local path or s3:// URI) in `labels.format`.")
    output: str = Field(description="Run folder: checkpoints under train/, the best model under model/.")
    aligned: str | None = Field(None, description="Aligned model folder (align's output/model); null: `encoder`.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="The encoder when `aligned` is null.")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="How to read the label file.")
    head: Literal["auto", "distribution", "scalar"] = Field(
        "auto", description="auto: a distribution head when the labels have distributions."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before each linear layer of the aesthetic head.")
    hidden_dim: int | None = Field(
        None, ge=1, description="Hidden width of the aesthetic head, an MLP Linear → GELU → Linear (its hidden "
        "layer is the aesthetic feature h_T that distill's hou_teacher term distils); null: one linear layer.")
    classifiers: ClassifiersConfig | None = Field(
        None, description="Hou et al.'s combined teacher (arXiv 2206.00809): frozen object classifiers pooled at "
        "several levels and concatenated, replacing `aligned`/`encoder`; only the head trains (give it "
        "hidden_dim). null: fine-tune `aligned` or `encoder`.")
    train: TrainerConfig = Field(default_factory=TrainerConfig, description=TRAIN_DESCRIPTION)
    decode_batch_size: int = Field(32, ge=1, description=DECODE_BATCH_DESCRIPTION)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=MAX_PIXELS_DESCRIPTION)

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return single_input(value)

    @model_validator(mode="after")
    def _one_encoder(self) -> TeacherConfig:
        if self.classifiers is not None and self.aligned:
            raise ValueError("classifiers and aligned: the combined teacher's encoder is the frozen classifiers; "
                             "set aligned: null")
        return self


@dataclass
class TeacherResult:
    """What a teacher run did."""

    output: str
    steps: int
    train_rows: int
    val_rows: int
    head: dict
    metrics: dict
    seconds: float


def run(cfg: TeacherConfig) -> TeacherResult:
    """Train (or resume) the teacher; export the checkpoint with the best ``val_srcc`` to ``output/model``."""
    from cskd_ray.train.common import build_trainer
    from cskd_ray.train.supervise import best_checkpoint, encoder_for, export_model, head_spec, labeled_datasets

    start = time.perf_counter()
    _, preprocess, _ = encoder_for(cfg.aligned, cfg.encoder, cfg.classifiers)  # fails fast on a bad encoder
    train_ds, val_ds, train, val_rows = labeled_datasets(cfg, preprocess)
    head = head_spec(cfg, train)
    world, batch = cfg.train.num_workers, cfg.train.batch_size
    steps_per_epoch = (len(train) // world) // max(1, batch // world)
    if batch % world or steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {batch}: must be a multiple of train.num_workers {world} and at most "
                          f"the {len(train)} training rows")
    factory = TaskFactory("cskd_ray.train.supervise", "SupervisedTask", {"head": asdict(head)})
    trainer = build_trainer("teacher", cfg.model_dump(mode="json"), cfg.train, factory, steps_per_epoch, train_ds,
                            cfg.output, val_dataset=val_ds, best_metric="val_srcc")
    state, weights = best_checkpoint(trainer.fit())
    export_model(cfg, head, preprocess, weights, state)
    return TeacherResult(cfg.output, int(state["step"]), len(train), val_rows, asdict(head), state["metrics"],
                         time.perf_counter() - start)


def check(cfg: TeacherConfig) -> None:
    """Before Ray starts: paths, the label file (read and parsed), the batch split and the encoder."""
    check_paths(cfg)
    check_exists("input", cfg.input, "label file")
    check_exists("labels.test_list", cfg.labels.test_list, "test list file")
    load_labels(cfg.labels.format, cfg.input, cfg.labels.images_root, test_list=cfg.labels.test_list)
    check_batch(cfg)
    if cfg.classifiers is not None:
        check_classifiers(cfg.classifiers)
    else:
        check_encoder(cfg)


def summary(result: TeacherResult, stage: str = "teacher") -> str:
    """The lines ``cskd-ray teacher`` (or ``distill``) prints at the end."""
    val = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in sorted(result.metrics.items())
                    if k.startswith("val_"))
    return (f"{stage}: {result.steps} steps on {result.train_rows} training rows ({result.head['kind']} head), "
            f"best validation on {result.val_rows} images: {val}; {result.seconds:.1f} s\n"
            f"{stage}: model at {result.output}/model, checkpoints at {result.output}/train")


def result_dict(result: TeacherResult) -> dict[str, Any]:
    """JSON-ready summary."""
    return asdict(result)
