"""The supervised task (phase 2a, the teacher; and the labeled part of distill): encoder + aesthetic head on labels.

The stage around it (config, checks, trainer) is :mod:`cskd_ray.stages.teacher`; this module holds what runs on
the Train workers and what the teacher and distill stages share: the head spec, the labeled datasets, the
best checkpoint and the exported model folder.

Losses (formulas in :mod:`cskd_ray.losses`):

* distribution labels (AVA, PARA): softmax head, EMD_r with r = 2,
  EMD = ((1/K) Σ_k |CDF_p(k) − CDF_q(k)|^r)^(1/r), per sample, then the batch mean (NIMA);
* scalar labels (AADB, TAD66K, KonIQ, SPAQ): regression head, MSE on the score normalised to [0, 1]
  with the training labels' range, ŝ = (s − lo) / (hi − lo).

Each checkpoint carries validation SRCC, PLCC, accuracy and EMD (r = 1); the checkpoint with the best
``val_srcc`` becomes the exported model (``output/model``).

With ``classifiers`` (Hou et al.'s combined teacher, arXiv 2206.00809) the encoder is frozen
(:class:`cskd_ray.models.multilevel.MultiLevelFeatures`) and only the head trains: an MLP when ``hidden_dim`` is
set, H(f) = W_2 · Dropout(GELU(W_1 · Dropout(f))). The frozen classifiers are still part of the model, so
the checkpoints and the exported folder hold them and the folder loads like any other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.datasets import table_dataset
from cskd_ray.io.labels import TEST_SPLIT, carve_validation, load_labels
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch
from cskd_ray.losses import emd_loss, score_mse
from cskd_ray.metrics import evaluate_scores
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.models.multilevel import KIND as MULTILEVEL
from cskd_ray.models.multilevel import backbones_from, create_multilevel_encoder, multilevel_name
from cskd_ray.models.registry import create_encoder, encoder_dim
from cskd_ray.train.checkpoints import MODEL_FILE, STATE_FILE
from cskd_ray.train.config import ClassifiersConfig, EncoderConfig
from cskd_ray.train.ingest import decode_labeled
from cskd_ray.train.step import RowCounts


@dataclass(frozen=True)
class HeadSpec:
    """What the head predicts and how to turn it back into a score on the dataset's scale."""

    kind: str  # "distribution" or "scalar"
    bins: int
    low: float  # scalar heads: training label range used to normalise scores to [0, 1]
    high: float
    threshold: float  # accuracy threshold on the dataset's scale

    def to_score(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted scores on the dataset's scale: Σ_k k·p_k (k = 1..K) or lo + ŝ (hi − lo)."""
        if self.kind == "distribution":
            return (output * torch.arange(1, self.bins + 1, device=output.device, dtype=output.dtype)).sum(-1)
        return self.low + output * (self.high - self.low)


def encoder_for(aligned: str | None, encoder: EncoderConfig, classifiers: ClassifiersConfig | None = None
                ) -> tuple[nn.Module, PreprocessSpec, int]:
    """The encoder, its preprocessing and width: ``classifiers`` (frozen), else the aligned one, else ``encoder``.

    With ``classifiers`` it is Hou et al.'s frozen multi-level extractor (:mod:`cskd_ray.models.multilevel`),
    whose parameters never train; the others are fine-tuned.
    """
    if classifiers is not None:
        loaded = create_multilevel_encoder(backbones_from(classifiers.model_dump()), classifiers.image_size)
        return loaded.model, loaded.preprocess, loaded.dim
    if aligned:
        from cskd_ray.train.align import load_aligned

        model, preprocess, _ = load_aligned(aligned)
        return model.encoder.train(), preprocess, encoder_dim(model.encoder)
    loaded = create_encoder(encoder.name, encoder.pretrained, image_size=encoder.image_size)
    return loaded.model, loaded.preprocess, loaded.dim


def stage_classifiers(stage: dict) -> ClassifiersConfig | None:
    """The ``classifiers`` section of a teacher (or distill) stage config given as a dict, if any."""
    return ClassifiersConfig(**stage["classifiers"]) if stage.get("classifiers") else None


class SupervisedTask(nn.Module):
    """E + H trained on labels; ``validate`` returns SRCC, PLCC, accuracy and EMD on the val batches.

    ``width`` is the encoder's output width (the input of H, and of distill's projections).
    """

    def __init__(self, stage: dict, head: dict) -> None:
        """``stage``: the teacher (or distill) stage's resolved config as a dict; ``head``: :class:`HeadSpec` fields."""
        super().__init__()
        self.spec = HeadSpec(**head)
        encoder, self.preprocess, self.width = encoder_for(stage.get("aligned"), EncoderConfig(**stage["encoder"]),
                                                           stage_classifiers(stage))
        self.model = EncoderWithHead(encoder, AestheticHead(self.width, self.spec.kind, self.spec.bins,
                                                            stage["dropout"], hidden=stage.get("hidden_dim")))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Encoder and head are fine-tuned together; a frozen encoder (``classifiers``) leaves the head alone."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(normalize_batch(batch["pixels"], self.preprocess, batch["pixels"].device)).float()

    def label_loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """EMD (r = 2) against the row's distribution, or MSE against its normalised score; 0 for no rows."""
        if not rows.any():
            return out.sum() * 0.0
        if self.spec.kind == "distribution":
            return emd_loss(out[rows], batch["distribution"].float()[rows], r=2.0)
        target = (batch["score"].float() - self.spec.low) / (self.spec.high - self.spec.low)
        return score_mse(out[rows], target[rows])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """EMD (r = 2) or normalised-score MSE on the valid rows (this worker's share of the global-batch mean)."""
        valid = batch["valid"].bool()
        counts = RowCounts({"loss": valid})
        return {"loss": counts.share("loss", self.label_loss(self._outputs(batch), batch, valid))}

    def validate(self, batches: Any) -> dict[str, float]:
        """``val_srcc``, ``val_plcc``, ``val_accuracy``, ``val_emd`` over all rows of ``batches``."""
        preds, targets, pred_dists, target_dists = [], [], [], []
        for batch in batches:
            valid, out = batch["valid"].bool(), self._outputs(batch)
            preds.append(self.spec.to_score(out)[valid].cpu())
            targets.append(batch["score"].float()[valid].cpu())
            if self.spec.kind == "distribution":
                pred_dists.append(out[valid].cpu())
                target_dists.append(batch["distribution"].float()[valid].cpu())
        dists = (torch.cat(pred_dists), torch.cat(target_dists)) if pred_dists else (None, None)
        metrics = evaluate_scores(torch.cat(preds), torch.cat(targets), self.spec.threshold, *dists)
        return {f"val_{k}": float(v) for k, v in metrics.items() if v is not None and k != "n"}


def head_spec(cfg: Any, train: pa.Table) -> HeadSpec:
    """The head for the training labels: ``cfg.head`` (auto: distribution when every row has one), bins, range."""
    has_dist = train.column("distribution").null_count == 0
    kind = ("distribution" if has_dist else "scalar") if cfg.head == "auto" else cfg.head
    if kind == "distribution" and not has_dist:
        raise ConfigError(f"head: 'distribution' needs distribution labels; {cfg.input} has scalar labels only")
    bins = len(train.column("distribution")[0].as_py()) if has_dist else 1
    scores = train.column("score").to_numpy()
    low, high = float(scores.min()), float(scores.max())
    threshold = cfg.labels.threshold if cfg.labels.threshold is not None else (
        5.0 if bins == 10 else (low + high) / 2)
    return HeadSpec(kind, bins, low, high if high > low else low + 1.0, threshold)


def labeled_datasets(cfg: Any, preprocess: PreprocessSpec) -> tuple[Any, Any, pa.Table, int]:
    """Train and val Ray datasets from the label file, the train table and the number of val rows.

    ``cfg`` is a teacher or distill stage config (``input``, ``labels``, ``decode_batch_size``, ``max_pixels``).
    """
    table = load_labels(cfg.labels.format, cfg.input, cfg.labels.images_root, test_list=cfg.labels.test_list)
    table = carve_validation(table, cfg.labels.val_fraction)
    split = table.column("split").fill_null("")
    is_val = pc.equal(split, cfg.labels.val_split)
    # test rows never train: with val_split "val" they are held out for the one final evaluation
    train, val = table.filter(pc.invert(pc.or_(is_val, pc.equal(split, TEST_SPLIT)))), table.filter(is_val)
    if len(val) == 0 or len(train) == 0:
        splits = sorted({str(s) for s in table.column("split").to_pylist()})
        raise ConfigError(f"labels.val_split {cfg.labels.val_split!r}: {cfg.input} has {len(train)} training and "
                          f"{len(val)} validation rows; both must be non-empty (splits found: {splits})")
    kwargs = {"batch_size": cfg.decode_batch_size, "batch_format": "pyarrow",
              "fn_kwargs": {"spec": preprocess.to_dict(), "max_pixels": cfg.max_pixels}}
    block = max(cfg.decode_batch_size, 64)
    datasets = [table_dataset(t, block).map_batches(decode_labeled, **kwargs) for t in (train, val)]
    return datasets[0], datasets[1], train, len(val)


def best_checkpoint(result: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """State and weights of the kept checkpoint with the highest ``val_srcc`` (the latest if none scored)."""
    best = max(result.best_checkpoints, key=lambda pair: pair[1].get("val_srcc", float("-inf")))[0] \
        if result.best_checkpoints else result.checkpoint
    with best.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        weights = load_file(str(Path(directory) / MODEL_FILE))
    return state, weights


def export_model(cfg: Any, head: HeadSpec, preprocess: PreprocessSpec, weights: dict, state: dict,
                 stage: str = "teacher") -> None:
    """Write ``output/model``: ``model.safetensors`` (E + H) and ``model.json`` (how to rebuild and score)."""
    model_dir = storage.join(cfg.output, "model")
    tensors = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    encoder = cfg.encoder.model_dump(mode="json")
    if cfg.aligned:
        encoder = json.loads(storage.read_text(storage.join(cfg.aligned, "model.json")))["encoder"]
    if getattr(cfg, "classifiers", None) is not None:  # rebuilt by cskd_ray.models.saved.build_encoder
        classifiers = cfg.classifiers.model_dump(mode="json")
        encoder = {"name": multilevel_name(backbones_from(classifiers)), "kind": MULTILEVEL, **classifiers}
    head_dict = {**asdict(head), **({"hidden": cfg.hidden_dim} if getattr(cfg, "hidden_dim", None) else {})}
    description = {"stage": stage, "encoder": encoder, "head": head_dict, "preprocess": preprocess.to_dict(),
                   "step": state["step"], "metrics": state["metrics"], "config": cfg.model_dump(mode="json")}
    storage.write_bytes_once(storage.join(model_dir, MODEL_FILE), save_safetensors(tensors), overwrite=True)
    storage.write_text_once(storage.join(model_dir, "model.json"), json.dumps(description, indent=2), overwrite=True)
