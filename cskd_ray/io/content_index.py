"""Content deduplication across the parts of an output and across runs, without a global in-memory set.

The parts pass (:mod:`cskd_ray.io.part_pass`) computes each content once per part by itself. Across parts and
across runs it asks this index: the digests (the first 16 bytes of each content's sha256) are *range-partitioned*
over ``K`` :class:`ContentIndexShard` actors, shard ``k`` owning the keys whose first 4 bytes, read as a big-endian
integer ``h``, satisfy ``⌊h·K / 2³²⌋ = k``. A read task sends each shard the keys of its chunk that fall in its
range; the shard answers, per key, either "yours" (the key was unknown, or already claimed by this very row: a
retried task asks again) or the *locator* ``(part, row)`` of the row that computes that content. The first claim
wins, so within one run a content is computed by one row, whichever part reads it first.

Across runs, each committed part also writes ``_digests/part-<p>.parquet``: every content of the part at its first
row there, computed there or copied from another part (``key`` binary, ``row`` int32), sorted by key in small row
groups. At start, shard ``k`` reads from each committed
part's file only the row groups overlapping its key range (Parquet statistics), so together the ``K`` shards read
each key once. A part committed before these files existed is read from its table's ``sha256`` column instead.

Memory: each shard holds its keys in sorted NumPy arrays (24 bytes a key: 16 of key, 8 of locator) plus a dict of
the keys first claimed in this run, merged into the arrays every ``MERGE_AT`` keys. Per process that is about
``24·N/K`` bytes for ``N`` distinct contents: ``K`` grows with the collection (:func:`shards_for`), so no process
holds the whole set, and the driver holds none of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cskd_ray.io import storage

DIGESTS = "_digests"
KEY_BYTES = 16
ROWS_PER_SHARD = 20_000_000  # distinct contents per shard actor: about 480 MB of sorted arrays
MAX_SHARDS = 256
MERGE_AT = 1 << 20  # keys claimed in this run are moved from the dict into the sorted arrays in batches of this
NO_SOURCE = -1  # a claim's answer: this row computes the content


def shards_for(rows: int) -> int:
    """How many shard actors an output of ``rows`` inputs gets: one per ``ROWS_PER_SHARD``, at least 1."""
    return max(1, min(MAX_SHARDS, math.ceil(rows / ROWS_PER_SHARD)))


def digest_key(sha256_hex: str) -> bytes:
    """The index key of a content: the first 16 bytes of its sha256 (a collision needs about 2⁶⁴ contents)."""
    return bytes.fromhex(sha256_hex[: 2 * KEY_BYTES])


def shard_of(keys: list[bytes], shards: int) -> np.ndarray:
    """The shard of each key: ``⌊h·K / 2³²⌋`` for ``h`` its first 4 bytes (a range partition of the key space)."""
    if not keys:
        return np.zeros(0, dtype=np.int64)
    high = np.frombuffer(b"".join(k[:8] for k in keys), dtype=">u8").astype(np.uint64)
    return ((high >> np.uint64(32)) * np.uint64(shards) >> np.uint64(32)).astype(np.int64)


def shard_bounds(shard: int, shards: int) -> tuple[bytes, bytes | None]:
    """The key range ``[low, high)`` of a shard as 8-byte prefixes (``high`` None for the last shard).

    A 16-byte key ``x`` is in the range exactly when ``low <= x < high`` byte-wise, as its first 8 bytes decide.
    """
    def prefix(k: int) -> bytes:
        return (((k << 32) + shards - 1) // shards << 32).to_bytes(8, "big") if k else bytes(8)

    return prefix(shard), prefix(shard + 1) if shard + 1 < shards else None


def locator(part: int, row: int) -> int:
    """A row's locator: ``part · 2³² + row``."""
    return (part << 32) | row


def split_locator(value: int) -> tuple[int, int]:
    """``(part, row)`` of a locator."""
    return value >> 32, value & 0xFFFF_FFFF


def digests_file(output: str, part: int) -> str:
    """The file of the keys of a committed part."""
    return storage.join(output, DIGESTS, f"part-{part:06d}.parquet")


def write_part_digests(output: str, part: int, sha256: list[str | None], rows: list[int]) -> None:
    """Write the keys (``sha256``) of ``part``'s ``rows`` that hold results, sorted, in row groups of 1,024."""
    pairs = sorted((digest_key(d), r) for d, r in zip(sha256, rows, strict=True) if d)
    table = pa.table({"key": pa.array([k for k, _ in pairs], pa.binary()),
                      "row": pa.array([r for _, r in pairs], pa.int32())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=1024, compression="zstd")
    storage.write_bytes_once(digests_file(output, part), sink.getvalue().to_pybytes(), overwrite=True)


def _in_range(keys: pa.Array, low: bytes, high: bytes | None) -> pa.Array:
    mask = pc.greater_equal(keys, pa.scalar(low, pa.binary()))
    if high is not None:
        mask = pc.and_(mask, pc.less(keys, pa.scalar(high, pa.binary())))
    return mask


def read_committed_keys(output: str, part: int, low: bytes, high: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """The keys of ``part`` in ``[low, high)`` and their rows.

    Read from the part's digests file (only the row groups whose statistics overlap the range) or, for a part
    committed without one, from its table's ``sha256`` column.
    """
    uri = digests_file(output, part)
    if storage.exists(uri):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle)
            groups = [g for g in range(reader.num_row_groups) if _overlaps(reader.metadata.row_group(g), low, high)]
            table = reader.read_row_groups(groups, columns=["key", "row"]) if groups else None
        if table is None:
            return np.zeros(0, dtype=f"S{KEY_BYTES}"), np.zeros(0, dtype=np.int64)
    else:  # committed before digests files existed: every row of the table with a digest can be a source
        from cskd_ray.io.part_pass import part_file

        fs, path = storage.resolve(part_file(output, part))
        table = pq.read_table(path, filesystem=fs, columns=["sha256", "row"])
        table = table.filter(pc.is_valid(table.column("sha256")))
        keys = [digest_key(d) for d in table.column("sha256").to_pylist()]
        table = pa.table({"key": pa.array(keys, pa.binary()), "row": table.column("row")})
    table = table.filter(_in_range(table.column("key"), low, high))
    keys = np.array(table.column("key").to_pylist(), dtype=f"S{KEY_BYTES}")
    return keys, (np.int64(part) << 32) | table.column("row").to_numpy().astype(np.int64)


def _overlaps(group: pq.RowGroupMetaData, low: bytes, high: bytes | None) -> bool:
    stats = group.column(0).statistics
    if stats is None or not stats.has_min_max:
        return True
    return stats.max >= low and (high is None or stats.min < high)


class ContentIndexShard:
    """Ray actor: the keys of one range of the key space, with the locator of the row that computes each.

    Args:
        output: The output folder (local or ``s3://``).
        committed: The parts committed before this run; their keys in this shard's range are loaded.
        shard: This shard's number, ``0 <= shard < shards``.
        shards: How many shards the key space is split into.
    """

    def __init__(self, output: str, committed: Iterable[int], shard: int, shards: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.low, self.high = shard_bounds(shard, shards)
        parts = sorted(committed)
        with ThreadPoolExecutor(max_workers=16) as pool:
            found = list(pool.map(lambda p: read_committed_keys(output, p, self.low, self.high), parts))
        self.keys = np.zeros(0, dtype=f"S{KEY_BYTES}")
        self.locators = np.zeros(0, dtype=np.int64)
        self._merge([k for k, _ in found], [v for _, v in found])
        self.claimed: dict[bytes, int] = {}
        self.loaded = len(self.keys)

    def _merge(self, keys: list[np.ndarray], locators: list[np.ndarray]) -> None:
        keys = np.concatenate([self.keys, *keys])
        locators = np.concatenate([self.locators, *locators])
        order = np.argsort(keys, kind="stable")  # a key in two committed parts keeps its first part's row
        keys, locators = keys[order], locators[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        self.keys, self.locators = keys[first], locators[first]

    def claim(self, keys: bytes, part: int, rows: np.ndarray) -> np.ndarray:
        """Claim the contents of ``rows`` of ``part`` (``keys``: 16 bytes each, concatenated).

        Returns:
            Per key, ``NO_SOURCE`` if that row computes the content (the first claim, or a repeated claim by the
            same row), else the locator of the row that computes it.
        """
        wanted = np.frombuffer(keys, dtype=f"S{KEY_BYTES}")
        mine = (np.int64(part) << 32) | np.asarray(rows, dtype=np.int64)
        out = np.full(len(wanted), NO_SOURCE, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, wanted), max(len(self.keys) - 1, 0))
        known = (self.keys[at] == wanted) if len(self.keys) else np.zeros(len(wanted), dtype=bool)
        for i in range(len(wanted)):
            source = int(self.locators[at[i]]) if known[i] else self.claimed.setdefault(
                keys[i * KEY_BYTES:(i + 1) * KEY_BYTES], int(mine[i]))
            if source != mine[i]:
                out[i] = source
        if len(self.claimed) >= MERGE_AT:
            self._merge([np.array(list(self.claimed), dtype=f"S{KEY_BYTES}")],
                        [np.fromiter(self.claimed.values(), dtype=np.int64, count=len(self.claimed))])
            self.claimed = {}
        return out

    def stats(self) -> dict:
        """``loaded`` keys of committed parts, ``keys`` held now, ``bytes`` of memory they take."""
        held = len(self.keys) + len(self.claimed)
        return {"loaded": self.loaded, "keys": held,
                "bytes": int(self.keys.nbytes + self.locators.nbytes + 120 * len(self.claimed))}


def claim_rows(shards: list, part: int, rows: list[int], sha256: list[str]) -> list[int]:
    """Claim the contents (``sha256``) of ``rows`` of ``part``: one call per shard that holds any of the keys.

    Returns:
        Per row, the locator of the row computing its content, or ``NO_SOURCE`` where the row computes it.
    """
    import ray

    keys = [digest_key(d) for d in sha256]
    owner = shard_of(keys, len(shards))
    answers = [NO_SOURCE] * len(rows)
    calls = []
    for shard in np.unique(owner):
        picked = np.flatnonzero(owner == shard)
        calls.append((picked, shards[int(shard)].claim.remote(
            b"".join(keys[i] for i in picked), part, np.array([rows[i] for i in picked], dtype=np.int64))))
    for picked, ref in calls:
        for i, source in zip(picked, ray.get(ref), strict=True):
            answers[int(i)] = int(source)
    return answers
