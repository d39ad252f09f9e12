"""The Ray Data pass shared by every stage that runs a model over images: features, label, score.

Given the URIs not yet in an output table, it streams them through read/hash/decode tasks (bytes read
once, bad files become error rows) and a pool of model actors, and appends one row per URI to the
output in atomic shards. Content seen before (in the output, or earlier in the same run) is not
computed again: those rows are *deferred* and copied from the representative's row at the end.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from cskd_ray.config import StrictModel
from cskd_ray.io.datasets import table_dataset
from cskd_ray.io.decode import DEFAULT_MAX_PIXELS
from cskd_ray.io.feature_cache import FeatureCache
from cskd_ray.io.sources import SourceConfig
from cskd_ray.io.transforms import PreprocessSpec


class ImagePassConfig(StrictModel):
    """Keys shared by the stages that run a model over many images with Ray Data (features, label, score)."""

    input: list[SourceConfig] = Field(description="Input sources (a plain string is a source URI).")
    output: str = Field(description="Output table URI (local folder or s3:// prefix), one row per input.")
    max_images: int | None = Field(None, ge=1, description="Total cap; sources share it by weight.")
    seed: int = Field(0, description="Seed for sampling under caps and for mixing order.")
    batch_size: int = Field(64, ge=1, description="Images per model forward pass.")
    decode_batch_size: int = Field(16, ge=1, description="Images per decode task batch.")
    decode_num_cpus: float = Field(
        0.5, gt=0, description="CPUs per read/decode task; unlike the actors' value, so Ray does not fuse decoding "
        "into the actors (it then overlaps model start-up and compute)."
    )
    read_threads: int = Field(
        8, ge=1, description="Reads in flight per read/decode task (object-store GETs and http(s) URLs are "
        "latency-bound); 1 reads one input at a time."
    )
    concurrency: int = Field(1, ge=1, description="Number of model actors.")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each model actor.")
    num_gpus_per_actor: float | None = Field(None, ge=0, description="null: 1 when the cluster has GPUs.")
    torch_threads: int = Field(0, ge=0, description="CPU threads per actor; 0: the machine's cores / actors.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images are refused (bombs).")
    shard_rows: int = Field(4096, ge=1, description="Rows per output Parquet shard.")
    object_store_mb: int = Field(
        256, ge=16, description="Object store memory the pass may hold at once (Ray Data resource limit), so memory "
        "stays flat whatever the number of images."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _strings_are_sources(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"uri": v} if isinstance(v, str) else v for v in value]
        return value


@dataclass(frozen=True)
class PipelineOptions:
    """Batching and resources of the pass (the same keys in every stage config that runs one)."""

    batch_size: int
    decode_batch_size: int
    decode_num_cpus: float
    read_threads: int
    concurrency: int
    num_cpus_per_actor: float
    num_gpus_per_actor: float | None
    max_pixels: int
    object_store_mb: int

    @classmethod
    def from_config(cls, cfg: Any) -> PipelineOptions:
        """Pick the options from a stage config that has these fields."""
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


SHARD_BYTES = 512 << 20  # a shard is also written once its buffered rows hold this much (packed images, token maps)
DEFERRED_CHUNK = 50_000  # contents whose copies are resolved per cache read at the end of a pass


class ShardWriter:
    """Buffers result rows and writes them in shards of ``shard_rows`` (or :data:`SHARD_BYTES`), with progress lines."""

    def __init__(self, table: FeatureCache, stage: str, shard_rows: int, total: int,
                 progress: Callable[[str], None]) -> None:
        self.table, self.stage, self.shard_rows, self.total = table, stage, shard_rows, total
        self.progress, self.buffer, self.buffered_bytes = progress, [], 0
        self.rows = self.errors = self.read_errors = 0
        self.reported = -1  # rows at the last progress line
        self.start = self.last_report = time.perf_counter()

    def add(self, rows: pa.Table) -> None:
        """Queue rows; write a shard when enough have gathered."""
        if len(rows) == 0:
            return
        rows = rows.select(self.table.schema.names).cast(self.table.schema)
        self.buffer.append(rows)
        self.buffered_bytes += rows.nbytes
        self.rows += len(rows)
        self.errors += len(rows) - rows.column("error").null_count
        self.read_errors += rows.column("sha256").null_count
        if sum(len(t) for t in self.buffer) >= self.shard_rows or self.buffered_bytes >= SHARD_BYTES:
            self.flush()
        if time.perf_counter() - self.last_report > 5:
            self.report()

    def flush(self) -> None:
        """Write whatever is buffered as one shard, its rows sorted by URI.

        Rows arrive in the order Ray Data's tasks finish, which differs from run to run; sorted, a pass that fits in
        one shard writes the same table every time, so training that reads it (align, distill) repeats too.
        """
        if self.buffer:
            self.table.write_shard(sorted_by_uri(pa.concat_tables(self.buffer)))
            self.buffer, self.buffered_bytes = [], 0

    def report(self) -> None:
        """Print one progress line (none when no row was added since the last one)."""
        if self.reported == self.rows:
            return
        self.last_report, self.reported = time.perf_counter(), self.rows
        rate = self.rows / max(self.last_report - self.start, 1e-9)
        self.progress(f"{self.stage}: {self.rows}/{self.total} rows ({100 * self.rows / max(self.total, 1):.1f}%), "
                      f"{rate:.1f} img/s, {self.errors} errors")


def sorted_by_uri(table: pa.Table) -> pa.Table:
    """``table``'s rows sorted by ``uri``, in one contiguous copy (as ``combine_chunks`` makes).

    Built from zero-copy slices (one per run of rows already in order) rather than ``Table.take``: taking rows of a
    list column builds an int64 index per list *value*, four times a float16 token map's own size (a shard of
    ViT-L/14 token maps holds billions of values).
    """
    if len(table) < 2:
        return table.combine_chunks()
    order = pc.sort_indices(table.column("uri")).to_numpy()
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(order)]])
    runs = [table.slice(int(order[start]), int(end - start)) for start, end in zip(starts, ends, strict=True)]
    return pa.concat_tables(runs).combine_chunks()


def expand_to_uris(table: pa.Table, uris_by_digest: dict[str, list[str]]) -> pa.Table:
    """One row per URI: a row computed for one representative is repeated for its duplicates.

    Raises:
        RuntimeError: A digest of ``uris_by_digest`` has no row in ``table`` (its URIs would get no row).
    """
    missing = set(uris_by_digest) - set(table.column("sha256").to_pylist())
    if missing:
        example, lost = uris_by_digest[min(missing)][0], sum(len(uris_by_digest[d]) for d in missing)
        raise RuntimeError(f"{len(missing)} contents have no representative row (e.g. {example}); their {lost} "
                           "inputs would be lost; rerun to compute them")
    index, uris = [], []
    for i, digest in enumerate(table.column("sha256").to_pylist()):
        for uri in uris_by_digest[digest]:
            index.append(i)
            uris.append(uri)
    out = table.take(pa.array(index, pa.int64()))
    return out.set_column(out.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))


def _stream(pending: list[str], known: list[str], preprocess: PreprocessSpec, actor_cls: type, actor_kwargs: dict,
            options: PipelineOptions, writer: ShardWriter, pack_size: int) -> list[tuple[str, str]]:
    """Run the Ray Data pass; write computed rows; return the deferred ``(uri, sha256)`` pairs."""
    import ray

    from cskd_ray.io.read_tasks import ContentRegistry, read_decode_batch

    gpus = options.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    registry = ray.remote(num_cpus=0)(ContentRegistry).remote()
    for start in range(0, len(known), 100_000):
        ray.get(registry.add.remote(known[start:start + 100_000]))
    # A read/decode task turns one block of URIs into 3·S² bytes per image: cap a block's decoded output at
    # about 32 MiB (and the object store at ``object_store_mb``) so memory does not grow with the collection.
    max_rows = max(1, (32 << 20) // (3 * preprocess.image_size**2))
    block_rows = max(options.decode_batch_size, min(max_rows, len(pending) // 8 or 1))
    rows = pa.table({"uri": pa.array(pending, pa.string()), "row": pa.array(range(len(pending)), pa.int64())})
    ds = table_dataset(rows, block_rows)  # the row id keys the registry's claims (see ContentRegistry)
    ds = ds.map_batches(read_decode_batch, batch_size=options.decode_batch_size, batch_format="numpy",
                        num_cpus=options.decode_num_cpus,
                        fn_kwargs={"spec": preprocess.to_dict(), "max_pixels": options.max_pixels,
                                   "registry": registry, "read_threads": options.read_threads,
                                   "pack_size": pack_size})
    ds = ds.map_batches(
        actor_cls, batch_size=options.batch_size, batch_format="numpy",
        fn_constructor_kwargs={**actor_kwargs, "device": "cuda" if gpus > 0 else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=options.concurrency), num_cpus=options.num_cpus_per_actor,
        num_gpus=gpus,
    )
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=options.object_store_mb << 20)
    deferred: list[tuple[str, str]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        is_deferred = batch.column("deferred")
        writer.add(batch.filter(pc.invert(is_deferred)))
        later = batch.filter(is_deferred)
        deferred.extend(zip(later.column("uri").to_pylist(), later.column("sha256").to_pylist(), strict=True))
    ray.kill(registry)
    return deferred


def process_pending(pending: list[str], known: list[str], preprocess: PreprocessSpec, actor_cls: type,
                    actor_kwargs: dict, options: PipelineOptions, writer: ShardWriter, pack_size: int = 0) -> int:
    """Give every pending URI its row in the writer's table; return how many rows were copied, not computed.

    Ray must be initialised. ``known`` lists the sha256 digests already in the table. With ``pack_size`` > 0 the
    read tasks also give the actors each computed row's packed training image (column ``image``;
    :mod:`cskd_ray.io.packing`), which the features actor keeps in its rows.
    """
    if not pending:
        return 0
    deferred = _stream(pending, known, preprocess, actor_cls, actor_kwargs, options, writer, pack_size)
    writer.flush()  # the representatives of deferred rows are now in the table
    uris_by_digest: dict[str, list[str]] = defaultdict(list)
    for uri, digest in deferred:
        uris_by_digest[digest].append(uri)
    digests = sorted(uris_by_digest)
    for start in range(0, len(digests), DEFERRED_CHUNK):  # bounded reads: rows may hold packed images
        chunk = {d: uris_by_digest[d] for d in digests[start:start + DEFERRED_CHUNK]}
        writer.add(expand_to_uris(writer.table.lookup(set(chunk)), chunk))
    writer.flush()
    writer.report()
    return len(deferred)
