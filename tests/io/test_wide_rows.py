"""Wide rows (token maps): no Arrow list-offset overflow, bounded row groups, old ``list`` shards still read.

A ``list`` column holds at most 2**31 - 1 values per array; 9,000 rows of 262,144 values (a ViT-L/14 token map)
exceed it. Lists of *nulls* have no value buffer, so the overflow is reproduced here without allocating 4 GiB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cskd_ray.io.feature_cache import FeatureCache, ResultTable, feature_schema, row_group_rows
from cskd_ray.io.row_pipeline import ShardWriter
from cskd_ray.io.transforms import PreprocessSpec
from cskd_ray.train.ingest import as_large_lists, decode_cached_rows

TOKEN_VALUES = 256 * 1024  # ViT-L/14 at 224 px: 16 x 16 patches x 1024 channels


def _null_token_rows(rows: int) -> pa.Table:
    """``rows`` result rows whose token map is a list of TOKEN_VALUES nulls (int32 offsets, like an actor's batch)."""
    offsets = pa.array(np.arange(0, (rows + 1) * TOKEN_VALUES, TOKEN_VALUES, dtype=np.int32))
    return pa.table({"uri": [f"u{i}" for i in range(rows)], "sha256": [f"{i:064x}" for i in range(rows)],
                     "tokens": pa.ListArray.from_arrays(offsets, pa.nulls(rows * TOKEN_VALUES)),
                     "error": pa.nulls(rows, pa.string())})


class _Recorder:
    """A table that records the shards it is asked to write (the Parquet writing is tested below)."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema, self.shards = schema, []

    def write_shard(self, table: pa.Table) -> str:
        self.shards.append(table)
        return f"shard-{len(self.shards)}"


def test_feature_columns_are_large_lists() -> None:
    schema = feature_schema("float16", tokens=True)
    assert pa.types.is_large_list(schema.field("feature").type)
    assert pa.types.is_large_list(schema.field("tokens").type)
    assert schema.field("tokens").type.value_type == pa.float16()


def test_a_shard_of_more_than_2_31_token_values_is_buffered_and_combined() -> None:
    batches = [_null_token_rows(1000) for _ in range(9)]  # 9,000 rows: 2.36e9 values in one shard
    with pytest.raises(pa.ArrowInvalid, match="overflow"):  # what the old list schema did at flush
        pa.concat_tables(batches).combine_chunks()
    schema = pa.schema([("uri", pa.string()), ("sha256", pa.string()), ("tokens", pa.large_list(pa.null())),
                        ("error", pa.string())])
    recorder = _Recorder(schema)
    writer = ShardWriter(recorder, "features", 9000, 9000, progress=lambda line: None)
    for batch in batches:
        writer.add(batch)
    writer.flush()
    assert [len(shard) for shard in recorder.shards] == [9000]
    tokens = recorder.shards[0].column("tokens")
    assert tokens.num_chunks == 1 and tokens.chunk(0).offsets[-1].as_py() == 9000 * TOKEN_VALUES > 2**31


def test_row_groups_hold_about_the_configured_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows, width = 40, 64 * 1024  # 128 KiB of float16 per row, 5 MiB in all
    values = pa.array(rng.standard_normal(rows * width).astype(np.float16))
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int64))
    table = pa.table({"uri": [f"u{i}" for i in range(rows)], "sha256": [f"{i:064x}" for i in range(rows)],
                      "feature": pa.LargeListArray.from_arrays(pa.array(np.arange(rows + 1), pa.int64()),
                                                               pa.array(np.zeros(rows, np.float16))),
                      "tokens": pa.LargeListArray.from_arrays(offsets, values), "error": pa.nulls(rows, pa.string())})
    assert row_group_rows(table, 1 << 20) == 7  # 1 MiB groups of ~128 KiB rows
    assert row_group_rows(table) == rows  # the default (64 MiB) keeps this shard in one group
    assert row_group_rows(table.slice(0, 0)) == 1
    cache = FeatureCache(str(tmp_path / "cache"), "float16", tokens=True)
    uri = cache.write_shard(table)
    metadata = pq.ParquetFile(uri).metadata
    assert metadata.num_row_groups == 1 and metadata.num_rows == rows
    back = cache.read()
    assert back.schema.equals(cache.schema)
    np.testing.assert_array_equal(back.column("tokens").combine_chunks().flatten().to_numpy(), values.to_numpy())


def test_shards_written_with_list_columns_are_read_as_large_lists(tmp_path: Path) -> None:
    old_schema = pa.schema([("uri", pa.string()), ("sha256", pa.string()), ("feature", pa.list_(pa.float16())),
                            ("error", pa.string())])
    folder = tmp_path / "cache"
    folder.mkdir()
    old = pa.table({"uri": ["a", "b"], "sha256": ["1" * 64, "2" * 64],
                    "feature": pa.array([[1.0, 2.0], None], pa.list_(pa.float16())), "error": [None, "not an image"]},
                   schema=old_schema)
    pq.write_table(old, folder / "part-old.parquet")
    cache = FeatureCache(str(folder))
    cache.write_shard(pa.table({"uri": ["c"], "sha256": ["3" * 64], "feature": pa.array([[3.0, 4.0]],
                                pa.large_list(pa.float16())), "error": pa.nulls(1, pa.string())}))
    table = cache.read().sort_by("uri")
    assert table.schema.equals(feature_schema("float16"))
    assert table.column("feature").to_pylist() == [[1.0, 2.0], None, [3.0, 4.0]]
    assert ResultTable(str(folder), cache.schema).lookup({"2" * 64}).column("error").to_pylist() == ["not an image"]
    # training reads shards block by block: old and new blocks get one type, then decode as before
    both = pa.concat_tables([as_large_lists(pq.read_table(folder / "part-old.parquet")),
                             as_large_lists(table.filter(pc.equal(table.column("uri"), "c")))])
    spec = PreprocessSpec(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rows = decode_cached_rows(both, spec.to_dict(), max_pixels=1 << 20)
    np.testing.assert_array_equal(rows["target"], [[1.0, 2.0], [3.0, 4.0]])


def test_a_block_of_only_error_rows_decodes_to_no_rows_of_the_targets_width() -> None:
    """A cache block whose rows all failed (corrupt files written together) must not stop training: it gives no
    rows, with the same columns and target width as every other block."""
    spec = PreprocessSpec(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    errors = as_large_lists(pa.table({"uri": ["a", "b"], "sha256": [None, "1" * 64],
                                      "feature": pa.nulls(2, pa.list_(pa.float16())),
                                      "error": ["read error: gone", "not an image"]}))
    rows = decode_cached_rows(errors, spec.to_dict(), max_pixels=1 << 20, width=2)
    assert rows["pixels"].shape == (0, 8, 8, 3) and rows["target"].shape == (0, 2) and rows["valid"].shape == (0,)


def test_a_shard_is_the_same_table_whatever_order_its_rows_arrive_in() -> None:
    """Rows come back in the order Ray Data's tasks finish; the shard is sorted by URI, each row whole (its token
    map and digest move with it), so two runs of a pass write the same table."""
    rng = np.random.default_rng(0)
    rows, width = 50, 6
    values = rng.standard_normal((rows, width)).astype(np.float16)
    full = pa.table({"uri": [f"img/{i:03d}.jpg" for i in range(rows)], "sha256": [f"{i:064x}" for i in range(rows)],
                     "tokens": pa.LargeListArray.from_arrays(pa.array(np.arange(rows + 1) * width, pa.int64()),
                                                             pa.array(values.ravel())),
                     "error": pa.nulls(rows, pa.string())})
    shards = []
    for _ in range(3):
        order = rng.permutation(rows)
        recorder = _Recorder(full.schema)
        writer = ShardWriter(recorder, "features", rows, rows, progress=lambda line: None)
        for chunk in np.array_split(order, 7):  # batches of arbitrary rows, in arbitrary order
            writer.add(full.take(pa.array(chunk)))
        writer.flush()
        assert len(recorder.shards) == 1 and recorder.shards[0].column("tokens").num_chunks == 1
        shards.append(recorder.shards[0])
    assert all(shard.equals(full) for shard in shards)
