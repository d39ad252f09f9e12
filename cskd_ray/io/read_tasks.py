"""The read side of every image pass (features, label, score): the content registry and the read/decode task.

The model actors that follow are the stages' own (``ClipFeatureActor``, ``ScoreActor``).

Each input's bytes are read exactly once. A read task hashes them and asks the
:class:`ContentRegistry` which digests are new; only the first row with a given content (and no copy in
the cache) is decoded and embedded, the others are marked ``deferred`` and get the representative's
row when the driver resolves them from the cache at the end.

Ray re-executes a read task whose worker died or whose output block was lost (lineage reconstruction). The
new attempt gets the same rows, so the registry answers it exactly as it answered the first: a claim is
keyed by the row that made it, and a row that claimed a digest is its representative on every attempt.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cskd_ray.io import storage
from cskd_ray.io.decode import decode_image
from cskd_ray.io.fetch import read_many
from cskd_ray.io.packing import pack_image
from cskd_ray.io.transforms import PreprocessSpec, resize_crop


class ContentRegistry:
    """Decides, once per content (sha256), which row of the run computes it; the same answer on every attempt.

    Run as a Ray actor with ``num_cpus=0``; one call per batch, so its cost is one RPC per batch. A digest
    is owned by the first row (its id in the run's pending list) that claims it, or by the cache when it
    was there before the run. Claims are idempotent: a re-executed task claims with the same row ids and is
    told again to compute what it owns, so no content is left without a representative row.
    """

    CACHED = -1  # owner of the digests already in the cache

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}

    def add(self, digests: list[str]) -> None:
        """Mark digests as known (already in the cache)."""
        for digest in digests:
            self.owner[digest] = self.CACHED

    def claim(self, digests: list[str], rows: list[int]) -> list[bool]:
        """For each ``(digest, row)``, True when ``row`` owns the digest (first to claim it) and must compute it.

        Args:
            digests: sha256 of each row's content.
            rows: Each row's id in the run (distinct for distinct rows, the same when a task is re-executed).
        """
        return [self.owner.setdefault(digest, row) == row for digest, row in zip(digests, rows, strict=True)]


def hash_reads(reads: list[bytes | Exception]) -> tuple[list[bytes | None], list[str], list[str]]:
    """Each read's bytes (None if it failed), sha256 (``""`` if it failed) and error (``read error: ...`` or ``""``)."""
    contents: list[bytes | None] = []
    digests, errors = [""] * len(reads), [""] * len(reads)
    for i, data in enumerate(reads):
        if isinstance(data, Exception):
            data, errors[i] = None, f"read error: {data}"
        else:
            digests[i] = hashlib.sha256(data).hexdigest()
        contents.append(data)
    return contents, digests, errors


def decode_rows(contents: list[bytes | None], rows: list[int], errors: list[str], preprocess: PreprocessSpec,
                max_pixels: int, packed: list[bytes] | None = None, pack_size: int = 0) -> np.ndarray:
    """Decode and resize/crop ``contents[i]`` for each ``i`` in ``rows``; the others stay black.

    Returns the (N, S, S, 3) uint8 pixels; a row that does not decode gets its error in ``errors``. With
    ``packed`` (a list of N ``b""``) and ``pack_size`` > 0, ``packed[i]`` receives the row's packed training
    image (:func:`cskd_ray.io.packing.pack_image`).
    """
    size = preprocess.image_size
    pixels = np.zeros((len(contents), size, size, 3), dtype=np.uint8)
    packing = packed is not None and pack_size > 0
    for i in rows:
        decoded = decode_image(contents[i], max_pixels, draft_size=max(size, pack_size) if packing else size)
        if decoded.ok:
            pixels[i] = resize_crop(decoded.image, preprocess)
            if packing:
                try:
                    packed[i] = pack_image(contents[i], decoded.image, pack_size)
                except Exception:  # noqa: BLE001 - no input may crash a job: the row keeps no copy (training reads
                    packed[i] = b""  # its URI instead)
        errors[i] = decoded.error or ""
    return pixels


def read_decode_batch(batch: dict[str, np.ndarray], spec: dict, max_pixels: int, registry: Any,
                      read_threads: int = 1, pack_size: int = 0) -> dict:
    """Ray Data task: read, hash, claim, decode and resize/crop a batch of ``uri`` rows with their ``row`` ids.

    The batch's inputs are read with up to ``read_threads`` reads in flight (:func:`cskd_ray.io.fetch.read_many`:
    local files, s3:// objects, http(s) URLs with retries); a failed read is that row's ``read error``.

    Returns columns ``uri``, ``sha256`` (``""`` if unreadable), ``pixels`` (N, S, S, 3) uint8, ``error``
    (``""`` when fine: a string column keeps its type through Ray's block conversions) and ``deferred``
    (the content is cached or claimed by another row: nothing to compute); with ``pack_size`` > 0 also
    ``image``, each computed row's packed training image (``b""`` for the others). No file raises.
    """
    import ray

    preprocess = PreprocessSpec.from_dict(spec)
    uris = [str(u) for u in batch["uri"]]
    contents, digests, errors = hash_reads(read_many(uris, read_threads, storage.read_bytes))
    readable = [i for i in range(len(uris)) if digests[i]]
    rows = [int(r) for r in batch["row"]]
    claimed = ray.get(registry.claim.remote([digests[i] for i in readable], [rows[i] for i in readable])) \
        if readable else []
    deferred = np.zeros(len(uris), dtype=bool)
    deferred[[i for i, is_new in zip(readable, claimed, strict=True) if not is_new]] = True
    computed = [i for i, is_new in zip(readable, claimed, strict=True) if is_new]
    packed = [b""] * len(uris) if pack_size > 0 else None
    pixels = decode_rows(contents, computed, errors, preprocess, max_pixels, packed, pack_size)
    out = {"uri": np.array(uris, dtype=str), "sha256": np.array(digests, dtype=str), "pixels": pixels,
           "error": np.array(errors, dtype=str), "deferred": deferred}
    if packed is not None:
        out["image"] = np.array(packed, dtype=object)
    return out
