"""The distillation task (phase 2c): the aligned student learns from labels and pseudo-labels.

The stage around it (config, checks, trainer) is :mod:`cskd_ray.stages.distill`.

Each batch mixes labeled rows (the label file's training split) and unlabeled rows (the pseudo-label
table written by ``label``, optionally joined by content with the CLIP feature cache):

    L = L_sup + λ_kd · D(student(x_u), teacher(x_u)) + λ_feat · (1 − cos(P'(E_s(x_u)), C(x_u)))
        + λ_cons · D(student(strong(x_u)), teacher(weak(x_u)))
        + Σ_t w_t · (1 − cos(P_t(E_s(x)), T_t(x)))
        + w_f · d(P_h(E_s(x)), h_T(x)) + w_p · D(student(x), T_H(x))

D is EMD (r = 2) for distribution heads and MSE on the normalised score for scalar heads; L_sup is the
same loss against the labels. The λ_kd term's teacher outputs come from the pseudo-label table (the
teacher is not run for it). The consistency term (λ_cons) runs the trained teacher online on a weakly
augmented view (a flip) while the student sees a strong view (crop, colour jitter, noise). The extra
teachers T_t (multi-teacher, arXiv 2206.00809: CLIP towers, timm classifiers) are frozen feature
extractors, each with its own student projection P_t, on every image of the batch. Every teacher is
frozen, in eval mode and outside the optimiser (:mod:`cskd_ray.train.teachers`). The last two terms distil
Hou et al.'s combined teacher T_H (``hou_teacher``: frozen object classifiers pooled at several levels with an
MLP head trained on the labels, the teacher stage's ``classifiers``) on every image of the batch: its hidden
layer h_T ("aesthetic feature", through the student's own projection P_h into the hidden width; d is
1 − cos or, with ``hou_feature_loss: mse``, the plain MSE (1/D)‖P_h(E_s(x)) − h_T(x)‖²) and its prediction
(D as above). λ_kd = ``kd_weight``, λ_feat = ``feat_weight``, λ_cons = ``consistency_weight``,
w_t = ``extra_teachers[t].weight``, w_f = ``hou_feature_weight``, w_p = ``hou_prediction_weight``; 0 turns a
term off. Validation and the exported model are as for the teacher.

Under DDP every term is the worker's share of its global-batch mean and every projection runs on every
worker, rows or not (:mod:`cskd_ray.train.step`): N workers train as one worker on the same global batches. The
consistency term's augmentations are drawn per row from (``train.seed``, epoch, row id), so a row gets the
same views on whichever worker it lands, and again after a resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from cskd_ray.config import ConfigError
from cskd_ray.io.feature_cache import LABEL_SCHEMA, FeatureCache, ResultTable
from cskd_ray.losses import cosine_alignment, emd_loss, feature_mse, score_mse
from cskd_ray.models.heads import ProjectionHead
from cskd_ray.train import augment
from cskd_ray.train.config import AugmentConfig, ExtraTeacherConfig
from cskd_ray.train.step import RowCounts
from cskd_ray.train.supervise import HeadSpec, SupervisedTask
from cskd_ray.train.teachers import build_extra_teacher, load_hidden_layer_teacher, load_scoring_teacher

HOU_FEATURE_LOSSES = {"cosine": cosine_alignment, "mse": feature_mse}
"""d of the Hou feature term by ``hou_feature_loss``: 1 − cos(s, t), or (1/(N·D)) Σ (s − t)²."""


class DistillTask(SupervisedTask):
    """Student E_s + H_s (+ projections P', P_t); ``forward`` returns ``loss`` and each term by name.

    Terms: ``sup``, ``kd``, and when their weight is > 0, ``feat``, ``cons``, ``teacher_<t>``, and with a
    ``hou_teacher`` ``hou_feat`` = d(P_h(E_s(x)), h_T(x)) and ``hou_pred`` = D(student(x), T_H(x)) on every valid
    row, weighted by w_f = ``hou_feature_weight`` and w_p = ``hou_prediction_weight``.
    """

    def __init__(self, stage: dict, head: dict, clip_dim: int) -> None:
        """``stage``: the distill stage's resolved config as a dict; ``head``: a :class:`HeadSpec`'s fields."""
        super().__init__(stage, head)
        self.kd_weight, self.feat_weight = float(stage["kd_weight"]), float(stage["feat_weight"])
        self.cons_weight = float(stage["consistency_weight"])
        self.augment, self.seed, self.epoch = AugmentConfig(**stage["augment"]), int(stage["train"]["seed"]), 0
        width = self.width
        self.projection = ProjectionHead(width, clip_dim) if self.feat_weight else None
        self.teacher, self.teacher_head = load_scoring_teacher(stage["teacher_model"]) if self.cons_weight \
            else (None, {})
        extra = [t for t in (ExtraTeacherConfig(**t) for t in stage["extra_teachers"]) if t.weight > 0]
        self.extra_teachers = [build_extra_teacher(t) for t in extra]
        self.extra_weights = [t.weight for t in extra]
        self.extra_projections = nn.ModuleList(ProjectionHead(width, teacher.dim, t.projection)
                                               for teacher, t in zip(self.extra_teachers, extra, strict=True))
        hou = stage.get("hou_teacher")
        self.hou_weights = (float(stage["hou_feature_weight"]), float(stage["hou_prediction_weight"])) if hou \
            else (0.0, 0.0)
        self.hou_feature_loss = HOU_FEATURE_LOSSES[stage.get("hou_feature_loss", "cosine")]
        self.hou_teacher = load_hidden_layer_teacher(hou) if any(self.hou_weights) else None
        self.hou_projection = ProjectionHead(width, self.hou_teacher.dim) \
            if self.hou_teacher is not None and self.hou_weights[0] else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student encoder, head and projections (the frozen teachers are not modules of the task)."""
        return list(self.parameters())

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at the start of each epoch: the augmentations differ per epoch."""
        self.epoch = epoch

    def row_random(self, rows: torch.Tensor) -> augment.RowRandom:
        """The augmentations' random draws for these row ids, from (``train.seed``, epoch, row id) only."""
        base = (self.seed * 1_000_003 + self.epoch) << 32
        return augment.RowRandom((base + int(row)) % (1 << 63) for row in rows.tolist())

    def _student(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and head outputs of the student on ``(N, 3, S, S)`` images in [0, 1]."""
        mean = torch.tensor(self.preprocess.mean, device=images01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=images01.device).view(1, 3, 1, 1)
        features = self.model.encoder((images01 - mean) / std)
        return features, self.model.head(features).float()

    def _consistency(self, images01: torch.Tensor, rows: torch.Tensor, row_ids: torch.Tensor,
                     like: torch.Tensor) -> torch.Tensor:
        """D(student(strong(x_u)), teacher(weak(x_u))) on the unlabeled rows."""
        if not rows.any():
            return like.sum() * 0.0
        images, rng = images01[rows], self.row_random(row_ids[rows])
        target = self.teacher(augment.weak(images, rng))
        _, student = self._student(augment.strong(images, self.augment.crop_scale, self.augment.jitter,
                                                  self.augment.noise, rng))
        return self._match_teacher(student, target, self.teacher_head)

    def _match_teacher(self, student: torch.Tensor, target: torch.Tensor, head: dict) -> torch.Tensor:
        """D(student, teacher): EMD (r = 2) on distributions; MSE on scores, the teacher's mapped to the student's."""
        if self.spec.kind == "distribution":
            return emd_loss(student, target, r=2.0)
        # the teacher's own scale → the student's normalised score (scalar heads of both)
        return score_mse(student, (self.teacher_score(target, head) - self.spec.low) / (self.spec.high - self.spec.low))

    def teacher_score(self, output: torch.Tensor, head: dict | None = None) -> torch.Tensor:
        """A teacher's scalar output on the dataset's scale (default: the online teacher's head)."""
        head = head if head is not None else self.teacher_head
        return head["low"] + output * (head["high"] - head["low"])

    def _hou_terms(self, images01: torch.Tensor, features: torch.Tensor, out: torch.Tensor,
                   rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``hou_feat`` = d(P_h(E_s(x)), h_T(x)) and ``hou_pred`` = D(student(x), T_H(x)) over ``rows``.

        With no row the feature term is ``0 · P_h(E_s(x))`` (a zero gradient for P_h on every DDP worker).
        """
        hidden, prediction = self.hou_teacher(images01[rows]) if rows.any() else (None, None)
        terms = {}
        if self.hou_projection is not None:
            terms["hou_feat"] = self._aligned(self.hou_projection(features.float()), hidden, rows,
                                              self.hou_feature_loss)
        if self.hou_weights[1]:
            terms["hou_pred"] = out.sum() * 0.0 if prediction is None \
                else self._match_teacher(out[rows], prediction, self.hou_teacher.head)
        return terms

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every term on its rows (labeled, unlabeled, unlabeled with a CLIP feature, all) and the weighted sum.

        Each term is this worker's share of its mean over the global batch (:class:`RowCounts`); a
        projection runs on all rows even when none of them has the term's target, so that its parameters
        get a (zero) gradient on every DDP worker.
        """
        valid, labeled = batch["valid"].bool(), batch["labeled"].bool()
        masks = {"sup": valid & labeled, "kd": valid & ~labeled}
        if self.projection is not None:
            masks["feat"] = valid & batch["has_feature"].bool()
        if self.teacher is not None:
            masks["cons"] = valid & ~labeled
        masks.update({f"teacher_{index}": valid for index in range(len(self.extra_teachers))})
        if self.hou_teacher is not None:
            masks.update({"hou_feat": valid} if self.hou_projection is not None else {})
            masks.update({"hou_pred": valid} if self.hou_weights[1] else {})
        counts = RowCounts(masks)
        images01 = batch["pixels"].permute(0, 3, 1, 2).float() / 255.0
        features, out = self._student(images01)
        terms = {"sup": self.label_loss(out, batch, masks["sup"]), "kd": self.label_loss(out, batch, masks["kd"])}
        if self.projection is not None:
            rows = masks["feat"]
            terms["feat"] = self._aligned(self.projection(features.float()), batch["feature"].float()[rows], rows)
        if self.teacher is not None:
            terms["cons"] = self._consistency(images01, masks["cons"], batch["row"], out)
        for index, (teacher, projection) in enumerate(zip(self.extra_teachers, self.extra_projections, strict=True)):
            rows = masks[f"teacher_{index}"]
            target = teacher(images01[rows]) if rows.any() else None
            terms[f"teacher_{index}"] = self._aligned(projection(features.float()), target, rows)
        if self.hou_teacher is not None:
            terms.update(self._hou_terms(images01, features, out, valid))
        terms = {name: counts.share(name, term) for name, term in terms.items()}
        weights = {"sup": 1.0, "kd": self.kd_weight, "feat": self.feat_weight, "cons": self.cons_weight,
                   **{f"teacher_{i}": w for i, w in enumerate(self.extra_weights)},
                   "hou_feat": self.hou_weights[0], "hou_pred": self.hou_weights[1]}
        loss = sum(weights[name] * term for name, term in terms.items())
        return {"loss": loss, **terms}

    @staticmethod
    def _aligned(projected: torch.Tensor, target: torch.Tensor | None, rows: torch.Tensor,
                 distance: Any = cosine_alignment) -> torch.Tensor:
        """d(P(E(x)), target) over ``rows``; d is 1 − cos unless ``distance`` is given.

        ``target`` holds those rows' targets (None if there is none). With no row it is ``0 · P(E(x))``: the
        projection still gets a gradient, of zeros.
        """
        if target is None or not rows.any():
            return projected.sum() * 0.0
        return distance(projected[rows], target)


def unlabeled_rows(cfg: Any, labeled_uris: set[str], head: HeadSpec) -> tuple[pa.Table, int]:
    """Pseudo-labeled rows (not labeled ones) with their CLIP feature when the cache has it; and the dim."""
    pseudo = ResultTable(cfg.pseudo_labels, LABEL_SCHEMA)
    if pseudo.read_meta() is None:
        raise ConfigError(f"pseudo_labels {cfg.pseudo_labels}: not a pseudo-label table; run `label` first")
    table = pseudo.read(["uri", "sha256", "score", "distribution", "error"])
    table = table.filter(pc.and_(table.column("error").is_null(),
                                 pc.invert(pc.is_in(table.column("uri"), pa.array(sorted(labeled_uris), pa.string())))))
    if head.kind == "distribution" and table.column("distribution").null_count:
        raise ConfigError(f"pseudo_labels {cfg.pseudo_labels}: the teacher gave scalar scores, the student has a "
                          "distribution head; train the teacher on distribution labels or set head: scalar")
    if cfg.max_unlabeled:
        table = table.slice(0, cfg.max_unlabeled)
    dim, features = 0, [None] * len(table)
    if cfg.feat_weight > 0:
        if not cfg.features:
            raise ConfigError("feat_weight > 0 needs `features`: the feature cache of the unlabeled images")
        cache = FeatureCache(cfg.features)
        dim = int((cache.read_meta() or {}).get("dim", 0))
        known = cache.lookup(set(table.column("sha256").to_pylist()), ["sha256", "feature", "error"])
        by_digest = dict(zip(known.column("sha256").to_pylist(), known.column("feature").to_pylist(), strict=True))
        features = [by_digest.get(d) for d in table.column("sha256").to_pylist()]
    distribution = table.column("distribution").cast(pa.list_(pa.float64()))
    rows = pa.table({"uri": table.column("uri"), "score": table.column("score"), "distribution": distribution,
                     "labeled": pa.array(np.zeros(len(table), dtype=bool)),
                     "feature": pa.array(features, pa.list_(pa.float32()))})
    return rows, dim


def check_teachers(cfg: Any, head: HeadSpec) -> None:
    """Fail before training when a teacher cannot be built or its outputs do not fit the student's head."""
    from cskd_ray.models.saved import describe_scoring_model
    from cskd_ray.train.teachers import describe_extra_teacher

    if cfg.consistency_weight > 0 and cfg.teacher_model:
        teacher = describe_scoring_model(cfg.teacher_model)["head"]
        if (teacher["kind"], teacher["bins"]) != (head.kind, head.bins):
            raise ConfigError(f"teacher_model {cfg.teacher_model}: a {teacher['kind']} head with {teacher['bins']} "
                              f"bins cannot teach the student's {head.kind} head with {head.bins} bins")
    for index, teacher_cfg in enumerate(cfg.extra_teachers):
        try:
            describe_extra_teacher(teacher_cfg)
        except ValueError as exc:
            raise ConfigError(f"extra_teachers.{index}.name: {exc}") from exc
    if cfg.hou_teacher:
        teacher = describe_scoring_model(cfg.hou_teacher)
        if "format" in teacher or not teacher["head"].get("hidden"):
            raise ConfigError(f"hou_teacher {cfg.hou_teacher}: its head has no hidden layer; train it with `teacher` "
                              "and hidden_dim (and classifiers for Hou et al.'s combined teacher)")
        if (teacher["head"]["kind"], teacher["head"]["bins"]) != (head.kind, head.bins):
            raise ConfigError(f"hou_teacher {cfg.hou_teacher}: a {teacher['head']['kind']} head with "
                              f"{teacher['head']['bins']} bins cannot teach the student's {head.kind} head with "
                              f"{head.bins} bins")


def uses_unlabeled(cfg: Any) -> bool:
    """Whether any term of the loss reads the unlabeled rows (λ_kd, λ_feat, λ_cons, an extra or the Hou teacher)."""
    return bool(cfg.kd_weight or cfg.feat_weight or cfg.consistency_weight
                or any(t.weight for t in cfg.extra_teachers)
                or (cfg.hou_teacher and (cfg.hou_feature_weight or cfg.hou_prediction_weight)))


