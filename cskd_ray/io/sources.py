"""Inputs: directories/prefixes, globs and manifests, several mixed with weights and caps.

:func:`expand_sources` turns source configs into one ordered list of URIs:

1. each source is listed (a directory, S3 prefix or glob) or read (a manifest: CSV/Parquet with a ``uri``
   column, or a ``url`` column as img2dataset's inputs have, or a ``.txt`` list with one URI per line and
   ``#`` comments; entries may be paths, s3:// URIs or http(s) URLs, and relative paths are resolved against
   the manifest's folder);
2. a per-source ``max_images`` keeps a seeded random sample of that many (in listing order);
3. a global ``max_images`` is shared between sources in proportion to their weights
   (n_i = ⌊N · w_i / Σw⌋ plus largest remainders, with what a small source cannot fill handed on);
4. the sources are interleaved by weight (a source of weight 2 appears twice as often in any prefix
   of the list), so a partial run covers every source in proportion; a URI listed twice is kept once.

Identical content at different URIs is deduplicated later, by sha256, by the stage that reads bytes.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field

from cskd_ray.config import StrictModel
from cskd_ray.io import storage
from cskd_ray.io.fetch import is_url


class SourceConfig(StrictModel):
    """One input source: a directory/prefix, a glob, or a manifest (CSV/Parquet with a ``uri`` column)."""

    uri: str = Field(description="Local path or s3:// URI of a directory, prefix, glob or manifest file (.csv / "
                     ".parquet with a uri or url column, .txt with one URI or http(s) URL per line).")
    weight: float = Field(1.0, gt=0, description="Relative share of this source when sources are mixed.")
    max_images: int | None = Field(None, ge=1, description="Cap on the images taken from this source.")
    suffixes: list[str] | None = Field(None, description="Keep only names with these endings, e.g. [.jpg].")
    kind: Literal["auto", "listing", "manifest", "webdataset", "image_parquet"] = Field(
        "auto", description="auto: a .tar file or glob is a WebDataset, a .parquet file with an image column (a "
        "struct {bytes, path} or binary) holds images, other .csv/.parquet/.txt files are manifests, anything "
        "else is listed. webdataset / image_parquet: every .tar / .parquet file under the URI (parts layout only)."
    )
    image_column: str | None = Field(
        None, description="image_parquet: the column with the image bytes (default: the first struct with a "
        "'bytes' field, else the first binary column)."
    )


MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq", ".txt")
URI_COLUMNS = ("uri", "url")  # the first one a manifest has is read


class SourceError(ValueError):
    """A source cannot be read or holds no inputs; the message names the source URI."""


def _is_manifest(source: SourceConfig) -> bool:
    if source.kind != "auto":
        return source.kind == "manifest"
    return source.uri.lower().endswith(MANIFEST_SUFFIXES) and not any(c in source.uri for c in "*?[")


def _manifest_values(uri: str, data: bytes) -> list:
    """The entries of a manifest's URI column (``uri`` or ``url``), or of a ``.txt`` list's lines."""
    if uri.lower().endswith(".txt"):
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise SourceError(f"manifest {uri}: a .txt URI list must be UTF-8 text: {exc}") from None
        return [line for line in lines if not line.lstrip().startswith("#")]
    try:
        if uri.lower().endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data))
        else:
            table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        kind = "CSV" if uri.lower().endswith(".csv") else "Parquet"
        raise SourceError(f"manifest {uri}: not a readable {kind} file: {exc}") from exc
    column = next((c for c in URI_COLUMNS if c in table.column_names), None)
    if column is None:
        raise SourceError(f"manifest {uri}: needs a 'uri' (or 'url') column; found {table.column_names}")
    return table.column(column).to_pylist()


def read_manifest(uri: str) -> list[str]:
    """Read a manifest's URIs (see the module docstring); relative paths are resolved to its folder."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise SourceError(f"manifest {uri}: {exc}") from exc
    base = manifest_folder(uri)
    return [resolve_entry(base, str(value)) for value in _manifest_values(uri, data)
            if value is not None and str(value).strip()]


def manifest_folder(uri: str) -> str:
    """The folder a manifest's relative entries are resolved against."""
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def resolve_entry(base: str, value: str) -> str:
    """A manifest entry as a URI: paths, s3:// URIs and http(s) URLs as given, relative paths under ``base``."""
    value = value.strip()
    if storage.is_remote(value) or is_url(value) or posixpath.isabs(value) or value.startswith("file://"):
        return value
    return storage.join(base, value)


def list_source(source: SourceConfig) -> list[str]:
    """All URIs of one source, in listing (or manifest) order, before caps.

    Raises:
        SourceError: The source is a container kind (read by the parts layout only), is missing or is empty.
    """
    if source.kind in ("webdataset", "image_parquet"):
        raise SourceError(f"input {source.uri}: {source.kind} sources are read by the parts layout only "
                          "(layout: parts, or auto)")
    if _is_manifest(source):
        uris = read_manifest(source.uri)
        if source.suffixes:
            uris = [u for u in uris if u.lower().endswith(tuple(s.lower() for s in source.suffixes))]
    else:
        suffixes = tuple(source.suffixes) if source.suffixes else None
        try:
            uris = [entry.uri for entry in storage.list_files(source.uri, suffixes)]
        except storage.StorageError as exc:
            raise SourceError(f"input {source.uri}: {exc}") from exc
    if not uris:
        ending = f" ending with {source.suffixes}" if source.suffixes else ""
        raise SourceError(f"input {source.uri}: holds no files{ending}")
    return uris


def _sample(uris: list[str], n: int | None, rng: np.random.Generator) -> list[str]:
    if n is None or n >= len(uris):
        return uris
    keep = np.sort(rng.choice(len(uris), size=n, replace=False))
    return [uris[i] for i in keep]


def share_by_weight(total: int, weights: Sequence[float], available: Sequence[int]) -> list[int]:
    """Split ``total`` items between sources by weight, never giving a source more than it has."""
    counts = [0] * len(weights)
    open_ = [i for i in range(len(weights)) if available[i] > 0]
    remaining = total
    while remaining > 0 and open_:
        wsum = sum(weights[i] for i in open_)
        exact = {i: remaining * weights[i] / wsum for i in open_}
        grant = {i: min(int(exact[i]), available[i] - counts[i]) for i in open_}
        leftover = remaining - sum(grant.values())
        for i in sorted(open_, key=lambda i: exact[i] - int(exact[i]), reverse=True):
            if leftover == 0:
                break
            if counts[i] + grant[i] < available[i]:
                grant[i] += 1
                leftover -= 1
        for i, g in grant.items():
            counts[i] += g
        given = sum(grant.values())
        remaining -= given
        open_ = [i for i in open_ if counts[i] < available[i]]
        if given == 0:
            break
    return counts


def interleave(groups: Sequence[list[str]], weights: Sequence[float]) -> list[str]:
    """Merge lists so each appears at a rate proportional to its weight (smooth weighted round-robin)."""
    positions = [0] * len(groups)
    credit = [0.0] * len(groups)
    out: list[str] = []
    total = sum(len(g) for g in groups)
    while len(out) < total:
        live = [i for i, g in enumerate(groups) if positions[i] < len(g)]
        wsum = sum(weights[i] for i in live)
        for i in live:
            credit[i] += weights[i]
        pick = max(live, key=lambda i: credit[i])
        credit[pick] -= wsum
        out.append(groups[pick][positions[pick]])
        positions[pick] += 1
    return out


def expand_sources(sources: Sequence[SourceConfig], max_images: int | None = None, seed: int = 0) -> list[str]:
    """Turn source configs into the ordered, capped, mixed list of input URIs (see module docstring).

    Raises:
        SourceError: A source does not exist, cannot be read, or holds no files.
    """
    if not sources:
        raise SourceError("no input sources given")
    rng = np.random.default_rng(seed)
    groups = [_sample(list_source(s), s.max_images, rng) for s in sources]
    weights = [s.weight for s in sources]
    if max_images is not None:
        counts = share_by_weight(max_images, weights, [len(g) for g in groups])
        groups = [_sample(g, n, rng) for g, n in zip(groups, counts, strict=True)]
    seen: set[str] = set()
    unique = []
    for uri in interleave(groups, weights):
        if uri not in seen:
            seen.add(uri)
            unique.append(uri)
    return unique
