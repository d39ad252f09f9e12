"""The alignment task (phase 1): a timm encoder + projection head trained to match cached CLIP features.

The stage around it (config, checks, trainer, exported model) is :mod:`cskd_ray.stages.align`. Each Ray
Train worker streams its shard of the feature cache joined with the images: Ray Data reads the
cache's Parquet shards (``uri``, ``feature``), and CPU tasks read and decode each image and resize it
for the encoder. No CLIP forward pass runs here: the targets come from the cache.

Loss (``loss`` in the config; formulas in :mod:`cskd_ray.losses`): ``cosine`` L = 1 − cos(P(E(x)), C(x))
(default), ``mse`` L = ‖normalize(P(E(x))) − normalize(C(x))‖², or ``smooth_l1_tokens``
L = mean SmoothL1_β(P(E_tok(x)) − LayerNorm(C_tok(x))) on patch-token maps (Feature Distillation, arXiv
2205.14141): P is then a 1×1 projection of each student patch token, and the cache must hold CLIP's token
maps (features with ``tokens: true``) on the same grid as the student's (a ViT).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.datasets import parquet_dataset
from cskd_ray.io.feature_cache import FeatureCache
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch
from cskd_ray.losses import alignment_loss
from cskd_ray.models.heads import EncoderWithProjection, ProjectionHead
from cskd_ray.models.registry import create_encoder
from cskd_ray.train.checkpoints import MODEL_FILE
from cskd_ray.train.config import EncoderConfig
from cskd_ray.train.ingest import as_large_lists, decode_cached_rows
from cskd_ray.train.step import RowCounts

MODEL_DIR = "model"  # the aligned model under the stage's output


class AlignTask(nn.Module):
    """E + P trained so that P(E(x)) matches C(x); ``forward(batch)`` returns ``loss`` and ``cosine``."""

    def __init__(self, stage: dict, clip_dim: int) -> None:
        """``stage``: the align stage's resolved config as a dict (``encoder``, ``loss``, ``token_beta``)."""
        super().__init__()
        encoder = EncoderConfig(**stage["encoder"])
        loaded = create_encoder(encoder.name, encoder.pretrained, image_size=encoder.image_size)
        self.preprocess = loaded.preprocess
        self.student = EncoderWithProjection(loaded.model, ProjectionHead(loaded.dim, clip_dim, encoder.projection))
        self.loss_name, self.beta = stage["loss"], float(stage["token_beta"])
        self.tokens = stage["loss"] == "smooth_l1_tokens"  # clip_dim is then CLIP's token width

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything in E and P is trained."""
        return list(self.student.parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Alignment loss and mean cosine similarity over the valid rows of the batch.

        Under DDP both are this worker's shares of the global-batch means (:class:`cskd_ray.train.step.RowCounts`),
        so the averaged gradient and metrics are those of one worker on the whole global batch.
        """
        valid = batch["valid"].bool()
        counts = RowCounts({"loss": valid})
        images = normalize_batch(batch["pixels"], self.preprocess, batch["pixels"].device)
        if self.tokens:
            return self._token_forward(images, batch["target"].float(), valid, counts)
        predicted = self.student(images).float()
        target = batch["target"].float()
        if not valid.any():
            zero = predicted.sum() * 0
            return {"loss": zero, "cosine": zero.detach()}
        loss = alignment_loss(self.loss_name, predicted[valid], target[valid])
        cosine = F.cosine_similarity(predicted.detach()[valid], target[valid], dim=-1).mean()
        return {"loss": counts.share("loss", loss), "cosine": counts.share("loss", cosine)}

    def _token_forward(self, images: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                       counts: RowCounts) -> dict:
        """SmoothL1 between projected student patch tokens and whitened CLIP tokens; per-token cosine."""
        encoder = self.student.encoder
        tokens = encoder.forward_features(images)[:, getattr(encoder, "num_prefix_tokens", 0):]
        predicted = self.student.projection(tokens).float()
        target = target.view(predicted.shape)
        if not valid.any():
            zero = predicted.sum() * 0
            return {"loss": zero, "cosine": zero.detach()}
        loss = alignment_loss("smooth_l1_tokens", predicted[valid], target[valid], beta=self.beta)
        whitened = F.layer_norm(target[valid], target.shape[-1:])
        cosine = F.cosine_similarity(predicted.detach()[valid], whitened, dim=-1).mean()
        return {"loss": counts.share("loss", loss), "cosine": counts.share("loss", cosine)}


def check_token_grids(cfg: Any, meta: dict, encoder: nn.Module) -> int:
    """For ``smooth_l1_tokens``: the cache has token maps and the student's patch grid equals CLIP's.

    ``cfg`` is the align stage's config (its ``input`` and ``encoder.name`` name the culprits).

    Returns:
        CLIP's token width (the projection's output size).
    """
    if "token_grid" not in meta:
        raise ConfigError(f"loss smooth_l1_tokens: the cache {cfg.input} holds pooled features only; run `features` "
                          "with tokens: true into a new output first")
    grid = getattr(getattr(encoder, "patch_embed", None), "grid_size", None)
    if grid is None or not hasattr(encoder, "forward_features"):
        raise ConfigError(f"loss smooth_l1_tokens: encoder.name {cfg.encoder.name!r} is not a ViT with a patch grid; "
                          "use cosine or mse for it")
    if list(grid) != list(meta["token_grid"]):
        raise ConfigError(f"loss smooth_l1_tokens: encoder.name {cfg.encoder.name!r} has a {tuple(grid)} token "
                          f"grid, CLIP {meta.get('model')} has {tuple(meta['token_grid'])}; choose models whose "
                          "image size / patch size match, or use cosine")
    return int(meta["token_dim"])


def training_dataset(cache_uri: str, spec: PreprocessSpec, decode_batch_size: int, max_pixels: int,
                     column: str = "feature", seed: int = 0, reshuffle_each_epoch: bool = False) -> tuple[Any, int]:
    """The Ray dataset of (pixels, CLIP target) for every cached row with a feature, and its row count.

    ``column`` is ``feature`` (pooled embeddings) or ``tokens`` (flattened token maps). The shards (table shards
    or committed parts) are read in an order drawn from ``seed``: the same every epoch, so that a resumed epoch
    skips exactly the batches it had done (``train.deterministic``), or, with ``reshuffle_each_epoch``, drawn
    again from (``seed``, execution) at every epoch. A cache written with ``pack_size`` > 0 gives each row's
    image from its ``image`` column (no original is read). The driver reads the shards' footers only
    (:meth:`cskd_ray.io.feature_cache.ResultTable.count_rows`), never their rows.
    """
    from ray.data import FileShuffleConfig

    cache = FeatureCache(cache_uri)
    meta = cache.read_meta()
    shards = cache.shards()
    if meta is None or not shards:
        raise ConfigError(f"input {cache_uri}: not a feature cache (no _meta.json or shards); run `features` first")
    rows = cache.count_rows()[1]
    if rows == 0:
        raise ConfigError(f"input {cache_uri}: the cache holds no image with a feature")
    fs, _ = storage.resolve(cache_uri)
    order = np.random.default_rng(seed).permutation(len(shards))
    columns = ["uri", column, "error"] + (["image"] if meta.get("pack_size") else [])
    shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if reshuffle_each_epoch else None
    ds = parquet_dataset([storage.resolve(shards[i])[1] for i in order], fs, columns, shuffle)
    ds = ds.map_batches(as_large_lists, batch_size=None, batch_format="pyarrow")  # one type across shard versions
    ds = ds.map_batches(decode_cached_rows, batch_size=decode_batch_size, batch_format="pyarrow",
                        fn_kwargs={"spec": spec.to_dict(), "max_pixels": max_pixels, "column": column,
                                   "width": _target_width(meta, column)})
    return ds, rows


def _target_width(meta: dict, column: str) -> int | None:
    """Values per row of the cache's ``feature`` (its dim) or ``tokens`` (grid cells × token dim) column."""
    if column == "tokens" and meta.get("token_grid") and meta.get("token_dim"):
        return int(math.prod(meta["token_grid"])) * int(meta["token_dim"])
    return int(meta["dim"]) if column == "feature" and meta.get("dim") else None


def load_aligned(model_dir: str) -> tuple[EncoderWithProjection, PreprocessSpec, dict]:
    """Load an aligned encoder + projection written by :func:`cskd_ray.stages.align.run` (no pickled code runs)."""
    from cskd_ray.models.registry import fetch_checkpoint, load_weights_into

    description = json.loads(storage.read_text(storage.join(model_dir, "model.json")))
    encoder = description["encoder"]
    loaded = create_encoder(encoder["name"], False, image_size=encoder.get("image_size"))
    model = EncoderWithProjection(loaded.model, ProjectionHead(loaded.dim, description["clip_dim"],
                                                               encoder["projection"]))
    load_weights_into(model, fetch_checkpoint(storage.join(model_dir, MODEL_FILE)), encoder["name"])
    return model.eval(), loaded.preprocess, description


