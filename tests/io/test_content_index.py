"""The content index of the parts layout: range-partitioned shards, first claim wins, committed keys loaded once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cskd_ray.io import content_index
from cskd_ray.io.content_index import (
    NO_SOURCE,
    ContentIndexShard,
    digest_key,
    locator,
    read_committed_keys,
    shard_bounds,
    shard_of,
    split_locator,
    write_part_digests,
)
from cskd_ray.io.part_pass import part_file


def _sha(i: int) -> str:
    return hashlib.sha256(f"content {i}".encode()).hexdigest()


@pytest.mark.parametrize("shards", [1, 3, 7, 256])
def test_shard_ranges_partition_the_key_space(shards: int) -> None:
    rng = np.random.default_rng(shards)
    keys = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(2000)]
    keys += [bytes(16), b"\xff" * 16]  # the two ends of the key space
    owner = shard_of(keys, shards)
    assert owner.min() >= 0 and owner.max() < shards
    for key, k in zip(keys, owner, strict=True):
        low, high = shard_bounds(int(k), shards)
        assert low <= key and (high is None or key < high)
        if k + 1 < shards:  # and not in the next range
            assert not shard_bounds(int(k) + 1, shards)[0] <= key
    if shards == 7:  # the ranges are about equal
        assert np.bincount(owner, minlength=shards).min() > 2000 / 7 * 0.8


def test_first_claim_wins_and_a_repeated_claim_of_the_same_row_is_its_own(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.setattr(content_index, "MERGE_AT", 3)  # claims move from the dict to the sorted arrays
    shard = ContentIndexShard(str(tmp_path), [], 0, 1)
    keys = [digest_key(_sha(i)) for i in range(5)]
    assert shard.claim(b"".join(keys[:2]), 4, np.array([0, 1])).tolist() == [NO_SOURCE, NO_SOURCE]
    answer = shard.claim(b"".join([keys[1], keys[2], keys[3]]), 5, np.array([7, 8, 9]))
    assert answer.tolist() == [locator(4, 1), NO_SOURCE, NO_SOURCE]
    assert len(shard.keys) == 4 and not shard.claimed  # merged
    # a retried task asks again for the same rows: they are still the computing rows
    assert shard.claim(b"".join([keys[1], keys[3], keys[4]]), 5, np.array([1, 9, 3])).tolist() == [
        locator(4, 1), NO_SOURCE, NO_SOURCE]
    assert split_locator(locator(123_456, 9_999)) == (123_456, 9_999)
    assert shard.stats()["keys"] == 5 and shard.stats()["loaded"] == 0


def test_committed_keys_are_loaded_once_across_shards_and_win_over_new_claims(tmp_path: Path) -> None:
    out = str(tmp_path)
    digests = {p: [_sha(100 * p + i) for i in range(40)] for p in range(3)}
    digests[1][5] = digests[0][3]  # committed twice (in runs before this index): the first part's row is kept
    for p in (0, 1):
        write_part_digests(out, p, digests[p], list(range(40)))
    # part 2 was committed before digests files existed: its table's sha256 column (with a null) is read instead
    table = pa.table({"sha256": pa.array([None, *digests[2][1:]], pa.string()), "row": pa.array(range(40), pa.int32())})
    pq.write_table(table, part_file(out, 2))
    groups = pq.ParquetFile(Path(out, "_digests", "part-000000.parquet"))
    assert groups.metadata.row_group(0).column(0).statistics.has_min_max
    shards = [ContentIndexShard(out, [0, 1, 2], k, 4) for k in range(4)]
    assert sum(s.loaded for s in shards) == 3 * 40 - 1 - 1  # every key once: the duplicate and the null dropped
    for p in range(3):
        for k in range(4):
            keys, _ = read_committed_keys(out, p, *shard_bounds(k, 4))
            assert all(shard_of([bytes(x) for x in keys], 4) == k)
    wanted = [digests[0][3], digests[2][7], _sha(999)]
    owner = shard_of([digest_key(d) for d in wanted], 4)
    answers = [int(shards[int(k)].claim(digest_key(d), 9, np.array([i]))[0])
               for i, (d, k) in enumerate(zip(wanted, owner, strict=True))]
    assert answers == [locator(0, 3), locator(2, 7), NO_SOURCE]


def _attempt(rows: list[int], sha: list[str | None], scores: list[float | None], deferred: list[bool],
             src: list[int], rep: list[int]) -> pa.Table:
    return pa.table({"sha256": pa.array(sha, pa.string()), "score": pa.array(scores, pa.float64()),
                     "error": pa.array([None] * len(rows), pa.string()), "deferred": pa.array(deferred),
                     "part": pa.array([0] * len(rows), pa.int32()), "row": pa.array(rows, pa.int32()),
                     "src": pa.array(src, pa.int32()), "rep": pa.array(rep, pa.int32())})


def test_copies_resolve_through_the_source_part_and_a_mixed_retry_is_refused(tmp_path: Path) -> None:
    """A part copying from part 1's attempt files gets the computed result even where part 1's row is itself
    deferred inside part 1; rows of two read attempts that disagree are refused, never given a wrong result."""
    from cskd_ray.io.part_pass import _resolve_results

    a, b = _sha(1), _sha(2)
    source = tmp_path / "p1.parquet"  # part 1: row 0 computes b, row 1 (the locator handed out) defers to it
    pq.write_table(_attempt([0, 1], [b, b], [7.0, None], [False, True], [1, 1], [0, 0]).drop(["part"]), source)
    names = ["sha256", "score", "error"]
    chunks = _attempt([0, 1, 2], [a, b, a], [3.0, None, None], [False, True, True], [0, 1, 0], [0, 1, 0])
    resolved = _resolve_results(str(tmp_path), 0, chunks, names, {1: [str(source)]})
    assert resolved.column("score").to_pylist() == [3.0, 7.0, 3.0]
    # row 0 from an attempt whose read failed, row 2 from one that deferred to it: refused
    mixed = _attempt([0, 1, 2], [None, b, a], [None, None, None], [False, True, True], [0, 1, 0], [0, 1, 0])
    with pytest.raises(RuntimeError, match="row 2's content has no computed result"):
        _resolve_results(str(tmp_path), 0, mixed, names, {1: [str(source)]})
