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
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cskd_ray import __version__, storage
from cskd_ray.config import FeaturesConfig, dump_config
from cskd_ray.data.sources import expand_sources
from cskd_ray.data.transforms import PreprocessSpec
from cskd_ray.feature_cache import FeatureCache, feature_schema, model_key

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


def _uri_blocks(table: pa.Table, rows_per_block: int) -> Any:
    """A Ray dataset of ``table`` split into blocks, so map tasks run in parallel."""
    import ray

    blocks = [table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)]
    return ray.data.from_arrow(blocks)


def _block_rows(n: int, batch: int) -> int:
    return max(batch, min(1024, n // 8 or 1))


class ShardWriter:
    """Buffers result rows and writes them to the cache in shards of ``shard_rows``, with progress."""

    def __init__(self, cache: FeatureCache, schema: pa.Schema, shard_rows: int, total: int,
                 progress: Callable[[str], None]) -> None:
        self.cache, self.schema, self.shard_rows, self.total = cache, schema, shard_rows, total
        self.progress, self.buffer, self.rows, self.errors, self.read_errors = progress, [], 0, 0, 0
        self.start = self.last_report = time.perf_counter()

    def add(self, table: pa.Table) -> None:
        """Queue rows; write a shard when enough have gathered."""
        if len(table) == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self.buffer.append(table)
        self.rows += len(table)
        self.errors += len(table) - table.column("error").null_count
        self.read_errors += table.column("sha256").null_count
        if sum(len(t) for t in self.buffer) >= self.shard_rows:
            self.flush()
        if time.perf_counter() - self.last_report > 5:
            self.report()

    def flush(self) -> None:
        """Write whatever is buffered as one shard."""
        if self.buffer:
            self.cache.write_shard(pa.concat_tables(self.buffer).combine_chunks())
            self.buffer = []

    def report(self) -> None:
        """Print one progress line."""
        self.last_report = time.perf_counter()
        rate = self.rows / max(self.last_report - self.start, 1e-9)
        self.progress(f"features: {self.rows}/{self.total} rows ({100 * self.rows / max(self.total, 1):.1f}%), "
                      f"{rate:.1f} img/s, {self.errors} errors")


def _expand_to_uris(table: pa.Table, uris_by_digest: dict[str, list[str]]) -> pa.Table:
    """One row per URI: rows computed for one representative are repeated for its duplicates."""
    index, uris = [], []
    for i, digest in enumerate(table.column("sha256").to_pylist()):
        for uri in uris_by_digest[digest]:
            index.append(i)
            uris.append(uri)
    out = table.take(pa.array(index, pa.int64()))
    return out.set_column(out.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))


def _embed_pending(cfg: FeaturesConfig, plan: FeaturesPlan, known: list[str], writer: ShardWriter) -> list[tuple]:
    """Stream the pending URIs through read/decode tasks and CLIP actors into the writer.

    Returns the deferred ``(uri, sha256)`` pairs: contents cached before or computed for another URI.
    """
    import ray

    from cskd_ray.feature_tasks import ClipFeatureActor, ContentRegistry, read_decode_batch

    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    registry = ray.remote(num_cpus=0)(ContentRegistry).remote()
    for start in range(0, len(known), 100_000):
        ray.get(registry.add.remote(known[start:start + 100_000]))
    ds = _uri_blocks(pa.table({"uri": pa.array(plan.pending, pa.string())}),
                     _block_rows(len(plan.pending), cfg.decode_batch_size))
    ds = ds.map_batches(read_decode_batch, batch_size=cfg.decode_batch_size, batch_format="numpy",
                        num_cpus=cfg.decode_num_cpus,
                        fn_kwargs={"spec": plan.preprocess.to_dict(), "max_pixels": cfg.max_pixels,
                                   "registry": registry})
    ds = ds.map_batches(
        ClipFeatureActor, batch_size=cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"clip": cfg.clip.model_dump(), "device": "cuda" if gpus > 0 else "cpu",
                               "precision": cfg.precision, "feature_dtype": cfg.feature_dtype,
                               "torch_threads": cfg.torch_threads, "actors": cfg.concurrency},
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus,
    )
    deferred: list[tuple] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        is_deferred = batch.column("deferred")
        writer.add(batch.filter(pc.invert(is_deferred)))
        later = batch.filter(is_deferred)
        deferred.extend(zip(later.column("uri").to_pylist(), later.column("sha256").to_pylist(), strict=True))
    ray.kill(registry)
    return deferred


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
    meta = {"model": cfg.clip.name, "weights": clip.weights, "random_weights": clip.random_weights,
            "preprocess": clip.preprocess.to_dict(), "dim": clip.dim, "kind": "pooled",
            "feature_dtype": cfg.feature_dtype, "model_key": model_key(cfg.clip.name, clip.weights, clip.preprocess),
            "cskd_ray_version": __version__}
    cache = FeatureCache(cfg.output)
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
    cache = FeatureCache(cfg.output)
    cache.ensure_meta(plan.meta)
    pending = plan.pending
    progress(f"features: {len(plan.uris)} inputs, {len(plan.uris) - len(pending)} already cached, "
             f"{len(pending)} to do")
    writer = ShardWriter(cache, feature_schema(cfg.feature_dtype), cfg.shard_rows, len(pending), progress)
    deferred: list[tuple] = []
    if pending:
        deferred = _embed_pending(cfg, plan, plan.cached_digests, writer)
        writer.flush()  # the representatives of deferred rows are now in the cache
        uris_by_digest: dict[str, list[str]] = defaultdict(list)
        for uri, digest in deferred:
            uris_by_digest[digest].append(uri)
        writer.add(_expand_to_uris(cache.lookup(set(uris_by_digest)), uris_by_digest))
        writer.flush()
        writer.report()
    reused = len(deferred)
    result = FeaturesResult(cfg.output, len(plan.uris), len(plan.uris) - len(pending), writer.rows,
                            writer.rows - reused - writer.read_errors, reused, writer.errors,
                            time.perf_counter() - start, plan.random_weights)
    _record_run(cache, cfg, result)
    return result


def _error_rows(hashed: pa.Table, feature_dtype: str) -> pa.Table:
    failed = hashed.filter(hashed.column("error").is_valid())
    feature_type = feature_schema(feature_dtype).field("feature").type
    return failed.append_column("feature", pa.nulls(len(failed), feature_type))


def _record_run(cache: FeatureCache, cfg: FeaturesConfig, result: FeaturesResult) -> None:
    if result.new_rows == 0:
        return  # a rerun that found everything cached writes nothing
    record = {"result": result.to_dict(), "config": json.loads(json.dumps(cfg.model_dump(mode="json")))}
    record["config_yaml"] = dump_config(cfg)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
    storage.write_text_once(storage.join(cache.uri, "_runs", name), json.dumps(record, indent=2))
