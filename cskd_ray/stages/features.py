"""The features stage: stream images through frozen CLIP actors into a cache no epoch recomputes.

The pass itself (read, hash, claim, decode, actors, shards) is the one every image stage shares
(:mod:`cskd_ray.io.row_pipeline`); this module adds the CLIP actor, the cache's model key and the plan.

Pipeline (Ray Data, streaming)::

    sources → URIs ──(skip URIs already in the cache)──► read bytes + sha256 (CPU tasks)
      ──(skip content already cached or seen twice)──► read + decode + resize/crop (CPU tasks)
      ──► CLIP actors (model loaded once per actor, batched, GPU when present) ──► Parquet shards

The cache at ``output`` is a folder of ``part-*.parquet`` shards with **one row per input URI**
(``uri``, ``sha256``, ``feature`` list<float16|float32> or null, ``image`` the packed training image
(:mod:`cskd_ray.io.packing`; ``pack_size: 0`` keeps none), ``error`` null or a message) and a
``_meta.json`` naming the model, weights digest, preprocessing, dimension and the model key. The cache
key is (sha256, model key): a rerun on the same inputs computes nothing, new images compute only
themselves, and duplicate content is computed once. Shards are written atomically and never
rewritten, so a killed run loses at most the rows it had not written yet.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from cskd_ray._version import __version__
from cskd_ray.config import ConfigError, StrictModel, dump_config
from cskd_ray.io import storage
from cskd_ray.io.feature_cache import FeatureCache, model_key
from cskd_ray.io.layout import LayoutConfig, check_layout, check_parts_config, resolve_layout
from cskd_ray.io.part_pass import CARRIED, run_parts
from cskd_ray.io.parts import plan_parts
from cskd_ray.io.preflight import check_paths, check_sources
from cskd_ray.io.row_pipeline import PipelineOptions, ShardWriter, process_pending
from cskd_ray.io.sources import expand_sources
from cskd_ray.io.transforms import PreprocessSpec

RANDOM_WEIGHTS_NOTE = (
    "note: CLIP weights are RANDOM (no model hub offline): features are not real CLIP features. For real "
    "ones set clip.pretrained to an open_clip tag (e.g. --set clip.name=ViT-L-14 --set clip.pretrained=openai), "
    "a checkpoint path or an s3:// URI."
)


class ClipConfig(StrictModel):
    """The frozen CLIP image encoder whose features are cached."""

    name: str = Field("cskd-tiny-vit", description="open_clip model name or hf-hub:org/repo.")
    pretrained: str | None = Field(
        None, description="open_clip tag (openai, laion2b_...), checkpoint path, s3:// URI, or null for random."
    )
    seed: int = Field(0, description="Seed of random weights, so every actor builds the same model.")


class FeaturesConfig(LayoutConfig):
    """The features stage: sources → decode → CLIP actors → Parquet feature cache."""

    clip: ClipConfig = Field(default_factory=ClipConfig, description="The frozen CLIP image encoder.")
    feature_dtype: Literal["float16", "float32"] = Field("float16", description="How cached features are stored.")
    tokens: bool = Field(
        False, description="Also store CLIP's patch-token map (grid² × width values per image) for the "
        "smooth_l1_tokens alignment; ViT CLIP models only. ViT-L-14 at 224 px: 256 × 1024 values, 512 KiB per "
        "image in float16.")
    pack_size: int = Field(
        256, ge=0, description="Also keep each image in its cache row for training (column image): its original "
        "bytes when the shorter side is at most pack_size px, else a JPEG resized to that shorter side. align then "
        "reads no original image again, epoch after epoch. At least the students' image size; 0: keep none "
        "(training reads every original each epoch).")


logger = logging.getLogger(__name__)


@dataclass
class FeaturesResult:
    """What a features run did.

    Attributes:
        inputs: Input URIs after listing, caps and mixing.
        already_cached: Inputs that had a row in the cache before this run (skipped without reading).
        new_rows: Rows this run wrote (one per input not cached before).
        computed: Distinct contents (sha256) this run decoded and embedded, failed decodes included.
        reused: New rows whose content was already in the cache under another URI (nothing computed).
        errors: New rows with an error (unreadable or undecodable input).
        seconds: Wall time of the run.
        random_weights: Whether the CLIP weights were random (features are not real CLIP features).
    """

    output: str
    inputs: int
    already_cached: int
    new_rows: int
    computed: int
    reused: int
    errors: int
    seconds: float
    random_weights: bool

    @property
    def images_per_s(self) -> float:
        """New rows written per second of wall time."""
        return self.new_rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


@dataclass
class FeaturesPlan:
    """What a features run will do, worked out without Ray (inputs listed, weights and cache checked)."""

    uris: list[str]
    pending: list[str]
    preprocess: PreprocessSpec
    meta: dict
    cached_digests: list[str]
    layout: str = "table"  # parts: the inputs are planned into parts when the run starts (with Ray)

    @property
    def random_weights(self) -> bool:
        """Whether the CLIP weights are a random initialisation."""
        return bool(self.meta["random_weights"])


def token_layout(name: str, visual: Any) -> dict[str, Any]:
    """``token_grid`` [h, w] and ``token_dim`` of a ViT CLIP tower (open_clip ``VisionTransformer``)."""
    visual = getattr(visual, "visual", visual)
    grid, width = getattr(visual, "grid_size", None), getattr(getattr(visual, "transformer", None), "width", None)
    if grid is None or width is None or not hasattr(visual, "output_tokens"):
        raise ConfigError(f"tokens: true needs a ViT CLIP with a patch-token grid; clip.name {name!r} has none "
                          "(use a ViT-* model, or tokens: false)")
    return {"token_grid": [int(grid[0]), int(grid[1])], "token_dim": int(width)}


def plan_features(cfg: FeaturesConfig) -> FeaturesPlan:
    """List the inputs, check the CLIP weights and the cache's model, and find what is not cached yet.

    Everything a user can get wrong fails here, before Ray starts or any image is read.

    Raises:
        cskd_ray.io.sources.SourceError: An input source is missing or empty.
        cskd_ray.config.ConfigError: The output holds features of another model.
        cskd_ray.models.UnknownModelError: The CLIP model name is unknown.
        cskd_ray.models.WeightsUnavailableError: The CLIP weights cannot be fetched.
    """
    from cskd_ray.models import describe_clip

    layout = resolve_layout(cfg)
    uris = expand_sources(cfg.input, cfg.max_images, cfg.seed) if layout == "table" else []
    clip = describe_clip(cfg.clip.name, cfg.clip.pretrained, seed=cfg.clip.seed)
    kind = "pooled+tokens" if cfg.tokens else "pooled"
    meta = {"model": cfg.clip.name, "weights": clip.weights, "random_weights": clip.random_weights,
            "preprocess": clip.preprocess.to_dict(), "dim": clip.dim, "kind": kind,
            "feature_dtype": cfg.feature_dtype, "pack_size": cfg.pack_size, "layout": layout,
            "model_key": model_key(cfg.clip.name, clip.weights, clip.preprocess, kind),
            "cskd_ray_version": __version__}
    if cfg.tokens:
        meta.update(token_layout(cfg.clip.name, clip.model))
    cache = FeatureCache(cfg.output, cfg.feature_dtype, cfg.tokens, cfg.pack_size > 0)
    cache.check_meta(meta)
    check_layout(cache, layout)
    existing = cache.read_meta()
    written = cfg.pack_size if existing is None else existing.get("pack_size", 0)  # earlier versions kept none
    if written != cfg.pack_size and "pack_size" not in cfg.model_fields_set:
        cfg.pack_size = meta["pack_size"] = written  # not asked for: an existing cache keeps its own
    if written != cfg.pack_size:
        raise ConfigError(f"pack_size: the cache {cfg.output} keeps training images at pack_size {written}; run with "
                          f"pack_size {written}, or write to a new output")
    if layout == "parts":  # resume and dedup are the parts pass's (commit markers, content index)
        return FeaturesPlan([], [], clip.preprocess, meta, [], layout)
    cached = cache.read(["uri", "sha256"])
    done = set(cached.column("uri").to_pylist())
    digests = sorted({d for d in cached.column("sha256").to_pylist() if d})
    return FeaturesPlan(uris, [u for u in uris if u not in done], clip.preprocess, meta, digests)


def run(cfg: FeaturesConfig, plan: FeaturesPlan | None = None,
        progress: Callable[[str], None] | None = None) -> FeaturesResult:
    """Run the features stage (see the module docstring). Ray must be initialised by the caller.

    Args:
        cfg: The stage config.
        plan: The result of :func:`plan_features` for ``cfg`` (computed here when omitted).
        progress: Receives one-line progress reports (default: the module logger).
    """
    progress = progress or logger.info
    start = time.perf_counter()
    plan = plan or plan_features(cfg)
    cache = FeatureCache(cfg.output, cfg.feature_dtype, cfg.tokens, cfg.pack_size > 0)
    cache.ensure_meta(plan.meta)
    actor_kwargs = {"clip": cfg.clip.model_dump(), "precision": cfg.precision, "feature_dtype": cfg.feature_dtype,
                    "torch_threads": cfg.torch_threads, "actors": cfg.concurrency, "tokens": cfg.tokens}
    if plan.layout == "parts":
        parts = plan_parts(cfg.input, cfg.output, cfg.part_rows, cfg.max_images, cfg.id_column, cfg.columns,
                           progress=progress)
        done = run_parts(parts, cfg.output, cache.schema, plan.preprocess, ClipFeatureActor, actor_kwargs,
                         PipelineOptions.from_config(cfg), "features", progress, None, cfg.content_shards,
                         cfg.pack_size)
        result = FeaturesResult(cfg.output, done.rows, done.rows_done_before, done.new_rows, done.computed,
                                done.deduplicated, done.errors, time.perf_counter() - start, plan.random_weights)
        _record_run(cache, cfg, result)
        return result
    pending = plan.pending
    progress(f"features: {len(plan.uris)} inputs, {len(plan.uris) - len(pending)} already cached, "
             f"{len(pending)} to do")
    writer = ShardWriter(cache, "features", cfg.shard_rows, len(pending), progress)
    reused = process_pending(pending, plan.cached_digests, plan.preprocess, ClipFeatureActor, actor_kwargs,
                             PipelineOptions.from_config(cfg), writer, cfg.pack_size)
    result = FeaturesResult(cfg.output, len(plan.uris), len(plan.uris) - len(pending), writer.rows,
                            writer.rows - reused - writer.read_errors, reused, writer.errors,
                            time.perf_counter() - start, plan.random_weights)
    _record_run(cache, cfg, result)
    return result


def _record_run(cache: FeatureCache, cfg: FeaturesConfig, result: FeaturesResult) -> None:
    if result.new_rows == 0:
        return  # a rerun that found everything cached writes nothing
    record = {"result": result.to_dict(), "config": json.loads(json.dumps(cfg.model_dump(mode="json")))}
    record["config_yaml"] = dump_config(cfg)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
    storage.write_text_once(storage.join(cache.uri, "_runs", name), json.dumps(record, indent=2))


class ClipFeatureActor:
    """Ray Data actor: loads the frozen CLIP image tower once and embeds batches of uint8 images."""

    def __init__(self, clip: dict, device: str, precision: str, feature_dtype: str, torch_threads: int,
                 actors: int = 1, tokens: bool = False) -> None:
        import torch

        from cskd_ray.models import create_clip
        from cskd_ray.models.precision import set_cpu_threads

        if device == "cpu":
            set_cpu_threads(torch_threads, actors)
        self.torch = torch
        self.loaded = create_clip(clip["name"], clip.get("pretrained"), seed=clip.get("seed", 0))
        self.device = torch.device(device)
        self.model = self.loaded.model.to(self.device)
        if device == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.precision, self.tokens = precision, tokens
        if tokens:  # open_clip's ViT then returns (pooled, patch tokens after ln_post)
            self.model.visual.output_tokens = True
        self.value_type = pa.float16() if feature_dtype == "float16" else pa.float32()
        self.np_dtype = np.float16 if feature_dtype == "float16" else np.float32

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """CLIP image features (N, D) of a ``(N, S, S, 3)`` uint8 batch, and token maps (N, T·C) if asked."""
        from cskd_ray.io.transforms import normalize_batch
        from cskd_ray.models.precision import autocast

        inputs = normalize_batch(pixels, self.loaded.preprocess, self.device)
        with self.torch.inference_mode(), autocast(self.device.type, self.precision):
            out = self.model(inputs)
        if not self.tokens:
            return out.float().cpu().numpy(), None
        pooled, tokens = out
        return pooled.float().cpu().numpy(), tokens.float().flatten(1).cpu().numpy()

    def _list_column(self, values: np.ndarray, ok: np.ndarray) -> pa.Array:
        """One large list per row, null where ``ok`` is false.

        64-bit offsets: the parts layout's commit takes rows of many blocks at once, and 10,000 ViT-L/14 token maps
        hold more values than a ``list``'s 32-bit offsets can address.
        """
        width = values.shape[1]
        offsets = pa.array(np.arange(0, (len(values) + 1) * width, width, dtype=np.int64))
        return pa.LargeListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=self.value_type),
                                             mask=pa.array(~ok))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Embed the rows to compute; return ``uri, sha256, feature, [tokens], [image], error, deferred``."""
        errors = [str(e) or None for e in batch["error"]]
        deferred = np.asarray(batch["deferred"], dtype=bool)
        ok = np.array([e is None for e in errors], dtype=bool) & ~deferred
        features = np.zeros((len(errors), self.loaded.dim), dtype=self.np_dtype)
        tokens = None
        if ok.any():
            pooled, token_maps = self.embed(batch["pixels"][ok])
            features[ok] = pooled.astype(self.np_dtype)
            if token_maps is not None:
                tokens = np.zeros((len(errors), token_maps.shape[1]), dtype=self.np_dtype)
                tokens[ok] = token_maps.astype(self.np_dtype)
        columns = {"uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
                   "sha256": pa.array([str(d) or None for d in batch["sha256"]], pa.string()),
                   "feature": self._list_column(features, ok)}
        if self.tokens:
            columns["tokens"] = self._list_column(tokens if tokens is not None else
                                                  np.zeros((len(errors), 1), self.np_dtype), ok)
        if "image" in batch:  # the packed training image (cskd_ray.io.packing), kept with the feature
            images = zip(batch["image"], ok, strict=True)
            columns["image"] = pa.array([bytes(b) if is_ok else None for b, is_ok in images], pa.large_binary())
        out = pa.table({**columns, "error": pa.array(errors, pa.string()), "deferred": pa.array(deferred)})
        for name in CARRIED:  # the parts layout's row keys (cskd_ray.io.part_pass)
            if name in batch:
                out = out.append_column(name, pa.array(np.asarray(batch[name], dtype=np.int32)))
        return out


def check(cfg: FeaturesConfig) -> None:
    """Before Ray starts: paths, that every source exists, and that the CLIP model name is known."""
    from cskd_ray.models.registry import list_clip_models, unknown_model

    check_paths(cfg)
    check_sources(cfg)
    check_parts_config(cfg)
    name = cfg.clip.name
    if not name.startswith("hf-hub:") and name not in list_clip_models():
        raise ConfigError(f"clip.name: {unknown_model('CLIP', name, list_clip_models())}")


def summary(result: FeaturesResult) -> str:
    """The lines ``cskd-ray features`` prints at the end."""
    lines = [f"features: {result.inputs} images, {result.already_cached} already cached, {result.new_rows} new rows "
             f"({result.computed} computed, {result.reused} reused by content), {result.errors} errors, "
             f"{result.images_per_s:.1f} img/s, {result.seconds:.1f} s", f"features: cache at {result.output}"]
    return "\n".join(lines + ([RANDOM_WEIGHTS_NOTE] if result.random_weights else []))
