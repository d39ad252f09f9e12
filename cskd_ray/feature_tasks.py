"""The Ray-side pieces of the features stage: content registry, read/decode tasks, CLIP actors.

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
import pyarrow as pa

from cskd_ray import storage
from cskd_ray.data.decode import decode_image
from cskd_ray.data.transforms import PreprocessSpec, resize_crop


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


def read_decode_batch(batch: dict[str, np.ndarray], spec: dict, max_pixels: int, registry: Any) -> dict:
    """Ray Data task: read, hash, claim, decode and resize/crop a batch of ``uri`` rows with their ``row`` ids.

    Returns columns ``uri``, ``sha256`` (``""`` if unreadable), ``pixels`` (N, S, S, 3) uint8, ``error``
    (``""`` when fine: a string column keeps its type through Ray's block conversions) and ``deferred``
    (the content is cached or claimed by another row: nothing to compute). No file raises.
    """
    import ray

    preprocess = PreprocessSpec.from_dict(spec)
    size, n = preprocess.image_size, len(batch["uri"])
    uris = [str(u) for u in batch["uri"]]
    contents: list[bytes | None] = []
    digests, errors = [""] * n, [""] * n
    for i, uri in enumerate(uris):
        try:
            data = storage.read_bytes(uri)
            digests[i] = hashlib.sha256(data).hexdigest()
        except (OSError, ValueError) as exc:
            data, errors[i] = None, f"read error: {exc}"
        contents.append(data)
    readable = [i for i in range(n) if digests[i]]
    rows = [int(r) for r in batch["row"]]
    claimed = ray.get(registry.claim.remote([digests[i] for i in readable], [rows[i] for i in readable])) \
        if readable else []
    deferred = np.zeros(n, dtype=bool)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i, is_new in zip(readable, claimed, strict=True):
        if not is_new:
            deferred[i] = True
            continue
        decoded = decode_image(contents[i], max_pixels, draft_size=size)
        if decoded.ok:
            pixels[i] = resize_crop(decoded.image, preprocess)
        errors[i] = decoded.error or ""
    return {"uri": np.array(uris, dtype=str), "sha256": np.array(digests, dtype=str), "pixels": pixels,
            "error": np.array(errors, dtype=str), "deferred": deferred}


class ClipFeatureActor:
    """Ray Data actor: loads the frozen CLIP image tower once and embeds batches of uint8 images."""

    def __init__(self, clip: dict, device: str, precision: str, feature_dtype: str, torch_threads: int,
                 actors: int = 1, tokens: bool = False) -> None:
        import torch

        from cskd_ray.models import create_clip
        from cskd_ray.precision import set_cpu_threads

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
        from cskd_ray.data.transforms import normalize_batch
        from cskd_ray.precision import autocast

        inputs = normalize_batch(pixels, self.loaded.preprocess, self.device)
        with self.torch.inference_mode(), autocast(self.device.type, self.precision):
            out = self.model(inputs)
        if not self.tokens:
            return out.float().cpu().numpy(), None
        pooled, tokens = out
        return pooled.float().cpu().numpy(), tokens.float().flatten(1).cpu().numpy()

    def _list_column(self, values: np.ndarray, ok: np.ndarray) -> pa.Array:
        width = values.shape[1]
        offsets = pa.array(np.arange(0, (len(values) + 1) * width, width, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=self.value_type),
                                        mask=pa.array(~ok))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Embed the rows to compute; return ``uri, sha256, feature, error, deferred``."""
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
        return pa.table({**columns, "error": pa.array(errors, pa.string()), "deferred": pa.array(deferred)})
