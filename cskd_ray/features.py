"""The features stage: stream images through frozen CLIP actors into a cache no epoch recomputes.

Pipeline (Ray Data, streaming)::

    sources → URIs ──(skip URIs already in the cache)──► read bytes + sha256 (CPU tasks)
      ──(skip content already cached or seen twice)──► read + decode + resize/crop (CPU tasks)
      ──► CLIP actors (model loaded once per actor, batched, GPU when present) ──► Parquet shards

The cache at ``output`` is a folder of ``part-*.parquet`` shards with **one row per input URI**
(``uri``, ``sha256``, ``feature`` list<float16|float32> or null, ``error`` null or a message) and a
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
from typing import Any

from cskd_ray import __version__, storage
from cskd_ray.config import ConfigError, FeaturesConfig, dump_config
from cskd_ray.data.sources import expand_sources
from cskd_ray.data.transforms import PreprocessSpec
from cskd_ray.feature_cache import FeatureCache, model_key
from cskd_ray.feature_tasks import ClipFeatureActor
from cskd_ray.row_pipeline import PipelineOptions, ShardWriter, process_pending

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
        cskd_ray.data.sources.SourceError: An input source is missing or empty.
        cskd_ray.config.ConfigError: The output holds features of another model.
        cskd_ray.models.UnknownModelError: The CLIP model name is unknown.
        cskd_ray.models.WeightsUnavailableError: The CLIP weights cannot be fetched.
    """
    from cskd_ray.models import describe_clip

    uris = expand_sources(cfg.input, cfg.max_images, cfg.seed)
    clip = describe_clip(cfg.clip.name, cfg.clip.pretrained, seed=cfg.clip.seed)
    kind = "pooled+tokens" if cfg.tokens else "pooled"
    meta = {"model": cfg.clip.name, "weights": clip.weights, "random_weights": clip.random_weights,
            "preprocess": clip.preprocess.to_dict(), "dim": clip.dim, "kind": kind,
            "feature_dtype": cfg.feature_dtype,
            "model_key": model_key(cfg.clip.name, clip.weights, clip.preprocess, kind),
            "cskd_ray_version": __version__}
    if cfg.tokens:
        meta.update(token_layout(cfg.clip.name, clip.model))
    cache = FeatureCache(cfg.output, cfg.feature_dtype, cfg.tokens)
    cache.check_meta(meta)
    cached = cache.read(["uri", "sha256"])
    done = set(cached.column("uri").to_pylist())
    digests = sorted({d for d in cached.column("sha256").to_pylist() if d})
    return FeaturesPlan(uris, [u for u in uris if u not in done], clip.preprocess, meta, digests)


def run_features(cfg: FeaturesConfig, plan: FeaturesPlan | None = None,
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
    cache = FeatureCache(cfg.output, cfg.feature_dtype, cfg.tokens)
    cache.ensure_meta(plan.meta)
    pending = plan.pending
    progress(f"features: {len(plan.uris)} inputs, {len(plan.uris) - len(pending)} already cached, "
             f"{len(pending)} to do")
    writer = ShardWriter(cache, "features", cfg.shard_rows, len(pending), progress)
    actor_kwargs = {"clip": cfg.clip.model_dump(), "precision": cfg.precision, "feature_dtype": cfg.feature_dtype,
                    "torch_threads": cfg.torch_threads, "actors": cfg.concurrency, "tokens": cfg.tokens}
    reused = process_pending(pending, plan.cached_digests, plan.preprocess, ClipFeatureActor, actor_kwargs,
                             PipelineOptions.from_config(cfg), writer)
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
