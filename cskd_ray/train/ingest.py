"""Ray Data steps that turn table rows into training batches: read, decode, resize/crop, and the row's targets.

These functions run inside Ray Data's tasks and are pickled by reference into every process that holds the
training datasets: the Train controller, Ray Data's split coordinator and the decode tasks. So this module
imports numpy, pyarrow and Pillow only, never torch, timm or open_clip (importing those costs each of
those processes seconds of CPU and ~700 MB of memory per training run; the Train workers import them anyway).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cskd_ray.io import storage
from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import with_large_lists
from cskd_ray.io.transforms import PreprocessSpec, resize_crop


def decode_for_training(uris: list[str], spec: PreprocessSpec, max_pixels: int,
                        packed: list[bytes | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read, decode and resize/crop images for a training batch: ``pixels`` (N, S, S, 3) uint8 and ``valid``.

    ``packed[i]``, when given and not None, is row i's packed image from the feature cache
    (:mod:`cskd_ray.io.packing`): it is decoded instead of reading ``uris[i]``, so a packed cache trains without
    reading any original. An image that cannot be read or decoded keeps its row with ``valid = 0`` (losses skip
    it), so every worker sees exactly the number of rows its step count was planned for.
    """
    size = spec.image_size
    pixels, valid = np.zeros((len(uris), size, size, 3), dtype=np.uint8), np.zeros(len(uris), dtype=np.uint8)
    for i, uri in enumerate(uris):
        try:
            data = packed[i] if packed is not None and packed[i] is not None else storage.read_bytes(uri)
            decoded = decode_image(data, max_pixels, draft_size=size)
        except (OSError, ValueError):
            continue
        if decoded.ok:
            pixels[i], valid[i] = resize_crop(decoded.image, spec), 1
    return pixels, valid


def as_large_lists(block: pa.Table) -> pa.Table:
    """A cache block with its list columns as large lists, so blocks of old (``list``) and new shards concatenate."""
    return block.cast(with_large_lists(block.schema))


def decode_cached_rows(batch: pa.Table, spec: dict, max_pixels: int, column: str = "feature",
                       width: int | None = None) -> dict[str, np.ndarray]:
    """Align: cached ``uri, feature`` rows → ``pixels`` (N, S, S, 3) uint8, ``target`` (N, width), ``valid``.

    Rows without a feature (the cache's error rows) are dropped; a batch of only such rows gives N = 0 (with
    ``width`` given, the target keeps its shape, so every block of the dataset has the same columns). A row with
    a packed ``image`` is decoded from it, others from their ``uri``. A row whose image no longer decodes keeps
    its place with ``valid = 0`` (the loss skips it), so every worker sees exactly the number of rows the step
    count was planned for.
    """
    batch = batch.filter(batch.column("error").is_null())  # rows without a feature are not training data
    values = batch.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    target = values.reshape(len(batch), width or (-1 if len(batch) else 0))
    packed = batch.column("image").to_pylist() if "image" in batch.column_names else None
    pixels, valid = decode_for_training(batch.column("uri").to_pylist(), PreprocessSpec.from_dict(spec), max_pixels,
                                        packed)
    return {"pixels": pixels, "target": target, "valid": valid}


def decode_labeled(batch: pa.Table, spec: dict, max_pixels: int) -> dict[str, np.ndarray]:
    """Teacher: labeled rows → ``pixels``, ``valid``, ``score`` and ``distribution`` (zeros if none)."""
    n = len(batch)
    dist = batch.column("distribution").combine_chunks()
    width = max((len(d) for d in dist.to_pylist() if d is not None), default=1)
    distribution = np.zeros((n, width), dtype=np.float32)
    for i, row in enumerate(dist.to_pylist()):
        if row is not None:
            distribution[i] = row
    pixels, valid = decode_for_training(batch.column("uri").to_pylist(), PreprocessSpec.from_dict(spec), max_pixels)
    return {"pixels": pixels, "valid": valid, "score": batch.column("score").to_numpy().astype(np.float32),
            "distribution": distribution}


def decode_mixed(batch: pa.Table, spec: dict, max_pixels: int, feature_dim: int) -> dict[str, np.ndarray]:
    """Distill: :func:`decode_labeled` plus ``labeled``, ``has_feature``, ``feature`` (N, D) and the ``row`` id."""
    out = decode_labeled(batch, spec, max_pixels)
    features = np.zeros((len(batch), max(1, feature_dim)), dtype=np.float32)
    has = np.zeros(len(batch), dtype=np.uint8)
    for i, row in enumerate(batch.column("feature").to_pylist()):
        if row is not None and feature_dim:
            features[i], has[i] = row, 1
    return {**out, "labeled": batch.column("labeled").to_numpy(zero_copy_only=False).astype(np.uint8),
            "has_feature": has, "feature": features, "row": batch.column("row").to_numpy().astype(np.int64)}
