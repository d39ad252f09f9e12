"""Phase 2c, distill: the aligned student learns from labels, the teacher's pseudo-labels and CLIP features.

    L = L_sup + λ_kd · D(student(x_u), teacher(x_u)) + λ_feat · (1 − cos(P'(E_s(x_u)), C(x_u)))
        + λ_cons · D(student(strong(x_u)), teacher(weak(x_u))) + Σ_t w_t · (1 − cos(P_t(E_s(x)), T_t(x)))
        + w_f · d(P_h(E_s(x)), h_T(x)) + w_p · D(student(x), T_H(x))

The last two terms (``hou_teacher``) distil Hou et al.'s combined teacher T_H (arXiv 2206.00809), trained by
``teacher`` with ``classifiers`` and ``hidden_dim``, on every image: its hidden layer h_T and its prediction.

Each batch mixes labeled rows (the label file's training split) and unlabeled rows (the pseudo-label table
written by ``label``, joined by content with the feature cache when ``feat_weight`` > 0). The task object and
the terms are in :mod:`cskd_ray.train.distill`; validation and the exported model are the teacher's
(:mod:`cskd_ray.stages.teacher`). Importing this module is light; :func:`run` imports the training stack.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.datasets import table_dataset
from cskd_ray.io.feature_cache import META_FILE
from cskd_ray.stages import teacher
from cskd_ray.stages.teacher import TeacherConfig, TeacherResult
from cskd_ray.train.config import AugmentConfig, ExtraTeacherConfig
from cskd_ray.train.ingest import decode_mixed
from cskd_ray.train.launch import TaskFactory


class DistillConfig(TeacherConfig):
    """Phase 2c: the aligned student learns from labels, the teacher's pseudo-labels and CLIP features.

    L = L_sup + kd_weight · D(student, pseudo-labels) + feat_weight · (1 − cos(P'(E_s(x)), C(x)))
        + consistency_weight · D(student(strong(x_u)), teacher(weak(x_u)))
        + Σ_t w_t · (1 − cos(P_t(E_s(x)), T_t(x)))   over extra_teachers
        + hou_feature_weight · d(P_h(E_s(x)), h_T(x)) + hou_prediction_weight · D(student(x), T_H(x))

    The last two terms, on every image of the batch (labeled and unlabeled), distil ``hou_teacher`` T_H, Hou et
    al.'s combined teacher (arXiv 2206.00809: frozen object classifiers pooled at several levels, an MLP head
    trained on the labels; the teacher stage with ``classifiers`` and ``hidden_dim``): h_T is its head's hidden
    layer, P_h the student's linear projection into that width, d = 1 − cos (``hou_feature_loss: cosine``) or
    the plain MSE (1/D)‖P_h(E_s(x)) − h_T(x)‖² (``mse``), D = EMD (r = 2) or score MSE as for kd. T_H is frozen
    and outside the optimiser and the checkpoints, as every teacher.
    """

    pseudo_labels: str = Field(description="Pseudo-label table written by `label` (the unlabeled images).")
    features: str | None = Field(None, description="Feature cache for the feature term; needed when feat_weight > 0.")
    kd_weight: float = Field(1.0, ge=0, description="λ_kd; 0 turns the pseudo-label term off.")
    feat_weight: float = Field(0.0, ge=0, description="λ_feat; 0 turns the CLIP feature term off.")
    max_unlabeled: int | None = Field(None, ge=1, description="Use at most this many pseudo-labeled images.")
    consistency_weight: float = Field(0.0, ge=0, description="λ_cons; > 0 runs `teacher_model` online on weakly "
                                                              "augmented unlabeled images.")
    teacher_model: str | None = Field(None, description="The teacher's model folder (teacher's output/model); "
                                                         "needed when consistency_weight > 0.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Strong view of the consistency term.")
    extra_teachers: list[ExtraTeacherConfig] = Field(
        default_factory=list, description="Extra frozen feature teachers, each with its own P_t and weight w_t.")
    hou_teacher: str | None = Field(
        None, description="Hou et al.'s combined teacher T_H (arXiv 2206.00809): a teacher model folder whose head "
        "has a hidden layer (teacher with classifiers and hidden_dim); null: no Hou terms.")
    hou_feature_weight: float = Field(1.0, ge=0, description="w_f of d(P_h(E_s(x)), h_T(x)) on every image, h_T the "
                                      "hou_teacher head's hidden layer; 0 turns it off.")
    hou_prediction_weight: float = Field(1.0, ge=0, description="w_p of D(student(x), T_H(x)) on every image (EMD "
                                         "r=2 or score MSE); 0 turns it off.")
    hou_feature_loss: Literal["cosine", "mse"] = Field(
        "cosine", description="d of the feature term: 1 − cos, or the plain MSE of P_h(E_s(x)) and h_T(x).")

    @model_validator(mode="after")
    def _teacher_for_consistency(self) -> DistillConfig:
        if self.consistency_weight > 0 and not self.teacher_model:
            raise ValueError("consistency_weight > 0 needs teacher_model (the teacher's output/model folder)")
        if self.classifiers is not None:
            raise ValueError("classifiers: a teacher option (Hou et al.'s combined teacher); train it with `teacher` "
                             "and pass its output/model as hou_teacher")
        return self


def run(cfg: DistillConfig) -> TeacherResult:
    """Train (or resume) the student; export the checkpoint with the best ``val_srcc`` to ``output/model``."""
    from cskd_ray.train.common import build_trainer
    from cskd_ray.train.distill import check_teachers, unlabeled_rows, uses_unlabeled
    from cskd_ray.train.supervise import best_checkpoint, encoder_for, export_model, head_spec, labeled_datasets

    start = time.perf_counter()
    _, preprocess, _ = encoder_for(cfg.aligned, cfg.encoder)
    _, val_ds, train, val_rows = labeled_datasets(cfg, preprocess)
    head = head_spec(cfg, train)
    check_teachers(cfg, head)
    unlabeled, dim = unlabeled_rows(cfg, set(train.column("uri").to_pylist()), head)
    labeled = pa.table({"uri": train.column("uri"), "score": train.column("score"),
                        "distribution": train.column("distribution"),
                        "labeled": pa.array(np.ones(len(train), dtype=bool)),
                        "feature": pa.nulls(len(train), pa.list_(pa.float32()))})
    if uses_unlabeled(cfg):
        mixed = pa.concat_tables([labeled, unlabeled.cast(labeled.schema)])
    else:  # every unlabeled term is off: a labels-only student, with batches of labeled rows only
        mixed = labeled
    mixed = mixed.take(pa.array(np.random.default_rng(cfg.train.seed).permutation(len(mixed))))
    mixed = mixed.append_column("row", pa.array(np.arange(len(mixed), dtype=np.int64)))  # keys the augmentations
    block = max(cfg.decode_batch_size, 64)
    train_ds = table_dataset(mixed, block).map_batches(
        decode_mixed, batch_size=cfg.decode_batch_size, batch_format="pyarrow",
        fn_kwargs={"spec": preprocess.to_dict(), "max_pixels": cfg.max_pixels, "feature_dim": dim})
    world, batch = cfg.train.num_workers, cfg.train.batch_size
    steps_per_epoch = (len(mixed) // world) // max(1, batch // world)
    if batch % world or steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {batch}: must be a multiple of train.num_workers {world} and at most "
                          f"the {len(mixed)} training rows")
    factory = TaskFactory("cskd_ray.train.distill", "DistillTask", {"head": asdict(head), "clip_dim": max(1, dim)})
    trainer = build_trainer("distill", cfg.model_dump(mode="json"), cfg.train, factory, steps_per_epoch, train_ds,
                            cfg.output, val_dataset=val_ds, best_metric="val_srcc")
    state, weights = best_checkpoint(trainer.fit())
    export_model(cfg, head, preprocess, weights, state, stage="distill")
    return TeacherResult(cfg.output, int(state["step"]), len(mixed), val_rows, asdict(head), state["metrics"],
                         time.perf_counter() - start)


def check(cfg: DistillConfig) -> None:
    """Before Ray starts: the teacher's checks, the pseudo-label table and (for the feature term) the cache."""
    teacher.check(cfg)
    if not storage.exists(storage.join(cfg.pseudo_labels, META_FILE)):
        raise ConfigError(f"pseudo_labels {cfg.pseudo_labels}: not a pseudo-label table; run `label` first")
    if cfg.feat_weight > 0 and not cfg.features:
        raise ConfigError("features: feat_weight > 0 needs `features`, the unlabeled images' feature cache")
    if cfg.feat_weight > 0 and not storage.exists(cfg.features):  # only the feature term reads it
        raise ConfigError(f"features {cfg.features}: no such feature cache; run `features` first")
    if cfg.hou_teacher and not storage.exists(storage.join(cfg.hou_teacher, "model.json")):
        raise ConfigError(f"hou_teacher {cfg.hou_teacher}: not a model folder (no model.json); train it with "
                          "`teacher` (classifiers, hidden_dim) and pass its output/model")


def summary(result: TeacherResult) -> str:
    """The lines ``cskd-ray distill`` prints at the end."""
    return teacher.summary(result, "distill")


def result_dict(result: TeacherResult) -> dict[str, Any]:
    """JSON-ready summary."""
    return asdict(result)

