"""Result tables keyed by content: the feature cache, and the pseudo-label / score tables (same layout).

The feature cache is Parquet shards with one row per input URI, keyed by (sha256, model key).

Layout of a cache folder (local or s3://)::

    _meta.json                 model name, weights digest, preprocessing, dimension, model key
    part-<time>-<id>.parquet   shards: uri, sha256, feature (large_list<float16|float32>, null on error),
                               [tokens (large_list, the flattened token map)], [image (the packed training
                               image, large_binary; :mod:`cskd_ray.io.packing`)], error
    _runs/<time>-<id>.json     what each run did and its resolved config

Shards are written atomically under unique names and never rewritten: readers never see half a
shard, and a killed run loses at most the rows it had not written yet.

Wide rows: feature columns are Arrow *large* lists (64-bit offsets). A plain ``list`` column holds at most
2**31 - 1 values per array, which a shard of 8,192 ViT-L/14 token maps (256 × 1024 values each) already
exceeds when its buffered batches are concatenated. Shards are written in row groups of about
:data:`ROW_GROUP_BYTES`, so a reader streams a shard of token maps a group at a time. Shards written with
``list`` columns by earlier versions are read as large lists (:meth:`ResultTable.read`), keeping their
value type (float16 or float32, as the features stage wrote them).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.transforms import PreprocessSpec

# The pseudo-label and score tables (``label``, ``score``, ``evaluate``): one row per input URI.
LABEL_SCHEMA = pa.schema([("uri", pa.string()), ("sha256", pa.string()), ("score", pa.float64()),
                          ("distribution", pa.list_(pa.float32())), ("model", pa.string()), ("error", pa.string())])


META_FILE = "_meta.json"
SHARD_PREFIX = "part-"
ROW_GROUP_BYTES = 64 << 20  # in memory, before compression: a reader holds about this much per group


def feature_schema(dtype: str = "float16", tokens: bool = False, packed: bool = False) -> pa.Schema:
    """The schema of the feature cache table.

    ``tokens`` adds the flattened token map (T·C values per row); ``packed`` the packed training image
    (``image``, large_binary, null on error rows; :mod:`cskd_ray.io.packing`).
    """
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [("uri", pa.string()), ("sha256", pa.string()), ("feature", pa.large_list(value))]
    if tokens:
        fields.append(("tokens", pa.large_list(value)))
    if packed:
        fields.append(("image", pa.large_binary()))
    return pa.schema([*fields, ("error", pa.string())])


def model_key(clip_name: str, weights: str, preprocess: PreprocessSpec, kind: str = "pooled") -> str:
    """The model half of the cache key: a digest of model name, weights, preprocessing and output kind."""
    blob = json.dumps({"model": clip_name, "weights": weights, "preprocess": preprocess.to_dict(), "kind": kind},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def with_large_lists(schema: pa.Schema, declared: pa.Schema | None = None) -> pa.Schema:
    """``schema`` with its ``list`` fields as ``large_list`` of the same values (shards of older versions).

    With ``declared``, only the fields that ``declared`` has as large lists (the feature columns; a score
    table's short ``distribution`` stays a ``list``).
    """
    def promote(field: pa.Field) -> bool:
        if not pa.types.is_list(field.type):
            return False
        return declared is None or (field.name in declared.names
                                    and pa.types.is_large_list(declared.field(field.name).type))

    return pa.schema([pa.field(f.name, pa.large_list(f.type.value_type), f.nullable) if promote(f) else f
                      for f in schema])


def row_group_rows(table: pa.Table, group_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per Parquet row group so that a group holds about ``group_bytes`` of ``table`` in memory (>= 1 row)."""
    per_row = table.nbytes / max(len(table), 1)
    return max(1, min(max(len(table), 1), int(group_bytes // max(per_row, 1))))


class ResultTable:
    """A folder (local or s3://) of write-once Parquet shards with one row per input URI and ``_meta.json``.

    Every stage that runs a model over images (features, label, score) writes one of these.
    """

    def __init__(self, uri: str, schema: pa.Schema) -> None:
        self.uri, self.schema = uri.rstrip("/"), schema

    def read_meta(self) -> dict | None:
        """The cache's ``_meta.json``, or None for a new cache."""
        meta_uri = storage.join(self.uri, META_FILE)
        return json.loads(storage.read_text(meta_uri)) if storage.exists(meta_uri) else None

    def shards(self) -> list[str]:
        """The complete shards (temporary files of interrupted writes are never listed)."""
        if not storage.exists(self.uri):
            return []
        return [e.uri for e in storage.list_files(self.uri, (".parquet",))
                if e.uri.rsplit("/", 1)[-1].startswith(SHARD_PREFIX)]

    def read(self, columns: list[str] | None = None, filter_expr: Any = None) -> pa.Table:
        """Read the cache (optionally some columns / a row filter) as one table."""
        shards = self.shards()
        if not shards:
            return self.schema.empty_table().select(columns or self.schema.names)
        fs, _ = storage.resolve(self.uri)
        paths = [storage.resolve(s)[1] for s in shards]

        def scan() -> pa.Table:
            found = pads.dataset(paths, filesystem=fs, format="parquet")  # the schema of the shards themselves
            found = found.replace_schema(with_large_lists(found.schema, self.schema))
            return found.to_table(columns=columns, filter=filter_expr)

        return storage.retry_io(scan, self.uri)

    def count_rows(self, threads: int = 16) -> tuple[int, int]:
        """``(rows, rows without an error)`` of the table, from the shards' Parquet footers, not their data.

        Each shard's footer records, per row group, its rows and the ``error`` column's null count; a shard
        without that statistic (none written by this package) has its ``error`` column read instead. Costs
        one small read per shard, so a training run's driver never scans the table.
        """
        from concurrent.futures import ThreadPoolExecutor

        fs, _ = storage.resolve(self.uri)

        def one(uri: str) -> tuple[int, int]:
            path = storage.resolve(uri)[1]

            def footer() -> pq.FileMetaData:
                with fs.open_input_file(path) as handle:
                    return pq.ParquetFile(handle).metadata

            meta = storage.retry_io(footer, uri)
            column = meta.schema.names.index("error")
            groups = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
            if all(stats is not None and stats.has_null_count for stats in groups):
                return meta.num_rows, sum(stats.null_count for stats in groups)
            errors = storage.retry_io(lambda: pq.read_table(path, columns=["error"], filesystem=fs), uri)
            return meta.num_rows, errors.column("error").null_count

        with ThreadPoolExecutor(max(1, threads)) as pool:
            counts = list(pool.map(one, self.shards()))
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def lookup(self, digests: set[str], columns: list[str] | None = None) -> pa.Table:
        """One row per digest found in the cache: a row with a feature when there is one, else its error row.

        ``columns`` (which must include ``sha256`` and ``error``) reads only those, e.g. not the packed images.
        """
        if not digests:
            return self.schema.empty_table().select(columns or self.schema.names)
        table = self.read(columns, filter_expr=pads.field("sha256").isin(pa.array(sorted(digests), pa.string())))
        best: dict[str, int] = {}
        for i, (digest, error) in enumerate(zip(table.column("sha256").to_pylist(),
                                                table.column("error").to_pylist(), strict=True)):
            if digest not in best or (error is None and table.column("error")[best[digest]].is_valid):
                best[digest] = i
        return table.take(pa.array(sorted(best.values()), pa.int64()))

    def write_shard(self, table: pa.Table) -> str:
        """Write one shard atomically under a fresh unique name and return its URI."""
        name = f"{SHARD_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows(table))
        uri = storage.join(self.uri, name)
        storage.write_bytes_once(uri, sink.getvalue())
        return uri

    def check_meta(self, meta: dict) -> None:
        """Raise :class:`ConfigError` when the cache holds features of another model than ``meta``'s."""
        current = self.read_meta()
        if current is not None and current.get("model_key") != meta["model_key"]:
            raise ConfigError(
                f"output {self.uri} holds results of {current.get('model')} ({current.get('weights')}, key "
                f"{current.get('model_key')}), not of {meta['model']} ({meta['weights']}, key {meta['model_key']}); "
                "choose another output"
            )

    def ensure_meta(self, meta: dict) -> None:
        """Write ``_meta.json`` for a new cache, or check that an existing cache holds the same model."""
        self.check_meta(meta)
        if self.read_meta() is None:
            storage.makedirs(self.uri)
            storage.write_text_once(storage.join(self.uri, META_FILE), json.dumps(meta, indent=2))


class FeatureCache(ResultTable):
    """The features stage's table: ``uri, sha256, feature, [tokens], [image], error`` (see the module docstring)."""

    def __init__(self, uri: str, dtype: str = "float16", tokens: bool = False, packed: bool = False) -> None:
        super().__init__(uri, feature_schema(dtype, tokens, packed))
