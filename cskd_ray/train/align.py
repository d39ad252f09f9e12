"""Phase 1, alignment: train a timm encoder + projection head to match cached CLIP features.

Each Ray Train worker streams its shard of the feature cache joined with the images: Ray Data reads the
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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from cskd_ray import storage
from cskd_ray.config import AlignConfig, ConfigError
from cskd_ray.data.transforms import PreprocessSpec, normalize_batch
from cskd_ray.feature_cache import FeatureCache
from cskd_ray.losses import alignment_loss
from cskd_ray.models.heads import EncoderWithProjection, ProjectionHead
from cskd_ray.models.registry import create_encoder
from cskd_ray.train.checkpoints import MODEL_FILE, STATE_FILE
from cskd_ray.train.common import build_trainer
from cskd_ray.train.ingest import decode_cached_rows
from cskd_ray.train.launch import TaskFactory
from cskd_ray.train.step import RowCounts

MODEL_DIR = "model"


class AlignTask(nn.Module):
    """E + P trained so that P(E(x)) matches C(x); ``forward(batch)`` returns ``loss`` and ``cosine``."""

    def __init__(self, stage: dict, clip_dim: int) -> None:
        super().__init__()
        cfg = AlignConfig(**stage)
        loaded = create_encoder(cfg.encoder.name, cfg.encoder.pretrained)
        self.preprocess = loaded.preprocess
        self.student = EncoderWithProjection(loaded.model, ProjectionHead(loaded.dim, clip_dim, cfg.encoder.projection))
        self.loss_name, self.beta = cfg.loss, cfg.token_beta
        self.tokens = cfg.loss == "smooth_l1_tokens"  # clip_dim is then CLIP's token width

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


def check_token_grids(cfg: AlignConfig, meta: dict, encoder: nn.Module) -> int:
    """For ``smooth_l1_tokens``: the cache has token maps and the student's patch grid equals CLIP's.

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
                     column: str = "feature") -> tuple[Any, int]:
    """The Ray dataset of (pixels, CLIP target) for every cached row with a feature, and its row count.

    ``column`` is ``feature`` (pooled embeddings) or ``tokens`` (flattened token maps).
    """
    import ray

    cache = FeatureCache(cache_uri)
    if cache.read_meta() is None or not cache.shards():
        raise ConfigError(f"input {cache_uri}: not a feature cache (no _meta.json or shards); run `features` first")
    rows = cache.read(["error"]).column("error").null_count
    if rows == 0:
        raise ConfigError(f"input {cache_uri}: the cache holds no image with a feature")
    fs, _ = storage.resolve(cache_uri)
    ds = ray.data.read_parquet([storage.resolve(s)[1] for s in cache.shards()], filesystem=fs,
                               columns=["uri", column, "error"])
    ds = ds.map_batches(decode_cached_rows, batch_size=decode_batch_size, batch_format="pyarrow",
                        fn_kwargs={"spec": spec.to_dict(), "max_pixels": max_pixels, "column": column})
    return ds, rows


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


def run_align(cfg: AlignConfig) -> AlignResult:
    """Train (or resume) the alignment of ``cfg.encoder`` to the CLIP features at ``cfg.input``.

    Checkpoints go to ``cfg.output/train`` (a rerun with the same output resumes from the latest one);
    the aligned model is written to ``cfg.output/model`` (``model.safetensors`` + ``model.json``).
    """
    start = time.perf_counter()
    meta = FeatureCache(cfg.input).read_meta() or {}
    probe = create_encoder(cfg.encoder.name, cfg.encoder.pretrained)  # fails fast on a bad name or weights
    tokens = cfg.loss == "smooth_l1_tokens"
    target_dim = check_token_grids(cfg, meta, probe.model) if tokens and meta else int(meta.get("dim", 0))
    dataset, rows = training_dataset(cfg.input, probe.preprocess, cfg.decode_batch_size, cfg.max_pixels,
                                     "tokens" if tokens else "feature")
    world, batch = cfg.train.num_workers, cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size {batch} must be a multiple of train.num_workers {world}")
    steps_per_epoch = (rows // world) // (batch // world)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {batch} is larger than the {rows} cached images")
    factory = TaskFactory(__name__, "AlignTask", {"clip_dim": target_dim})
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


def load_aligned(model_dir: str) -> tuple[EncoderWithProjection, PreprocessSpec, dict]:
    """Load an aligned encoder + projection written by :func:`run_align` (no pickled code runs)."""
    from cskd_ray.models.registry import fetch_checkpoint, load_weights_into

    description = json.loads(storage.read_text(storage.join(model_dir, "model.json")))
    encoder = description["encoder"]
    loaded = create_encoder(encoder["name"], False)
    model = EncoderWithProjection(loaded.model, ProjectionHead(loaded.dim, description["clip_dim"],
                                                               encoder["projection"]))
    load_weights_into(model, fetch_checkpoint(storage.join(model_dir, MODEL_FILE)), encoder["name"])
    return model.eval(), loaded.preprocess, description


def result_dict(result: AlignResult) -> dict:
    """JSON-ready summary."""
    return asdict(result)
