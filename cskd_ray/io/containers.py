"""Collections stored in containers: WebDataset tar shards and Parquet files with image bytes.

**WebDataset** (what img2dataset writes): a tar whose members are grouped by *key*, the name up to its first
``.`` after the last ``/`` (``00001/000010023.jpg``, ``00001/000010023.json``, ``00001/000010023.txt``). Every
image member is an input; a key's ``.json`` and ``.txt`` members are kept as the input's ``json`` and ``txt``
columns (text, as stored). :func:`index_tar` reads the tar once, as one stream (a single GET on S3), and
records where each image's bytes lie; :func:`read_ranges` later reads a batch of them with ranged reads,
adjacent members coalesced into one request.

**Parquet with image bytes** (Hugging Face ``datasets`` with an ``Image`` feature): a column that is a struct
``{bytes: binary, path: string}``, or a plain binary column. :func:`index_image_parquet` reads every column but
the image one (the other columns become pass-through columns) and :func:`read_parquet_images` reads the image
column of the row groups a batch needs.

Both index functions return one row per input with ``member`` (a name that locates it inside the container),
``offset`` and ``size`` (tar: byte range; Parquet: row index and 0), plus the container's own columns.
"""

from __future__ import annotations

import bisect
import itertools
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cskd_ray.io import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")
SIDECAR_SUFFIXES = (".json", ".txt")
MAX_SIDECAR_BYTES = 1 << 20  # a larger .json/.txt member is not kept as a column
COALESCE_GAP = 1 << 20  # ranged reads closer than this are one request


class ContainerError(ValueError):
    """A container cannot be read or is not of the expected kind; the message names it."""


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member name: ``a/b.c.jpg`` → (``a/b``, ``.c.jpg``)."""
    folder, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def index_tar(uri: str) -> pa.Table:
    """One row per image member of the tar at ``uri``: ``key, member, offset, size, json, txt``.

    Raises:
        ContainerError: The object is not a readable tar (the message names it and says why).
    """
    fs, path = storage.resolve(uri)
    images: list[tuple[str, str, int, int]] = []
    sidecars: dict[tuple[str, str], str] = {}
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if ext.endswith(IMAGE_SUFFIXES):
                    images.append((key, info.name, info.offset_data, info.size))
                elif ext in SIDECAR_SUFFIXES and info.size <= MAX_SIDECAR_BYTES:
                    member = tar.extractfile(info)
                    data = member.read() if member is not None else b""
                    sidecars[(key, ext)] = data.decode("utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise ContainerError(f"{uri}: no such tar") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ContainerError(f"{uri}: not a readable tar: {exc}") from exc
    keys = [key for key, _, _, _ in images]
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "member": pa.array([m for _, m, _, _ in images], pa.string()),
        "offset": pa.array([o for _, _, o, _ in images], pa.int64()),
        "size": pa.array([s for _, _, _, s in images], pa.int64()),
        "json": pa.array([sidecars.get((k, ".json")) for k in keys], pa.string()),
        "txt": pa.array([sidecars.get((k, ".txt")) for k in keys], pa.string()),
    })


def read_ranges(uri: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each ``(offset, size)`` range of the object at ``uri``, in the order given.

    Ranges sorted by offset and less than :data:`COALESCE_GAP` apart are read with one ranged request.

    Raises:
        storage.StorageError: The object cannot be opened or read.
    """
    if not ranges:
        return []
    fs, path = storage.resolve(uri)
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        last = groups[-1][-1]
        if ranges[i][0] - (ranges[last][0] + ranges[last][1]) <= COALESCE_GAP:
            groups[-1].append(i)
        else:
            groups.append([i])
    out: list[bytes] = [b""] * len(ranges)

    def read() -> None:
        with fs.open_input_file(path) as handle:
            for group in groups:
                start = ranges[group[0]][0]
                end = max(ranges[i][0] + ranges[i][1] for i in group)
                data = handle.read_at(end - start, start)
                if len(data) < end - start:
                    raise OSError(f"{uri}: object ends at {start + len(data)}, before byte {end}")
                for i in group:
                    offset, size = ranges[i]
                    out[i] = data[offset - start: offset - start + size]

    try:
        storage.retry_io(read, uri)
    except OSError as exc:
        raise storage.StorageError(f"{uri}: {exc}") from exc
    return out


def image_column_of(schema: pa.Schema, name: str | None = None) -> str:
    """The column holding image bytes.

    ``name`` if given, else the first struct with a binary ``bytes`` field (Hugging Face's ``Image`` feature),
    else the first binary column.

    Raises:
        ContainerError: No such column (the message lists the columns found).
    """
    def holds_bytes(field: pa.Field) -> bool:
        kind = field.type
        if pa.types.is_struct(kind):
            index = kind.get_field_index("bytes")
            return index >= 0 and (pa.types.is_binary(kind.field(index).type)
                                   or pa.types.is_large_binary(kind.field(index).type))
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

    found = [f"{f.name} ({f.type})" for f in schema]
    if name is not None:
        if name not in schema.names or not holds_bytes(schema.field(name)):
            raise ContainerError(f"image column {name!r}: not a binary column or a struct with a 'bytes' field; "
                                 f"columns: {found}")
        return name
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and holds_bytes(f)]
    binaries = [f.name for f in schema if not pa.types.is_struct(f.type) and holds_bytes(f)]
    if not structs and not binaries:
        raise ContainerError(f"no image column (a struct {{bytes, path}} or a binary column); columns: {found}")
    return (structs or binaries)[0]


def _open_parquet(uri: str) -> tuple[pq.ParquetFile, object]:
    fs, path = storage.resolve(uri)
    handle = fs.open_input_file(path)
    return pq.ParquetFile(handle), handle


@dataclass(frozen=True)
class ImageParquetIndex:
    """What planning needs of a Parquet file with images: its rows, image column and other columns."""

    rows: int
    image_column: str
    columns: dict[str, pa.ChunkedArray]  # the columns asked for that the file has (never the image column)
    paths: list[str | None]  # the image struct's ``path`` per row (None where it has none)


def index_image_parquet(uri: str, image_column: str | None = None,
                        columns: Sequence[str] | None = None) -> ImageParquetIndex:
    """Index a Parquet file with images: rows, the image column, and ``columns`` (default: all the others).

    Only the columns asked for are read (and the image struct's ``path`` field), never the image bytes.

    Raises:
        ContainerError: Not a readable Parquet file, or no image column.
    """
    try:
        parquet, handle = _open_parquet(uri)
    except FileNotFoundError as exc:
        raise ContainerError(f"{uri}: no such Parquet file") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise ContainerError(f"{uri}: not a readable Parquet file: {exc}") from exc
    with handle:
        schema = parquet.schema_arrow
        try:
            column = image_column_of(schema, image_column)
        except ContainerError as exc:
            raise ContainerError(f"{uri}: {exc}") from None
        wanted = [n for n in schema.names if n != column and (columns is None or n in columns)]
        rows = parquet.metadata.num_rows
        table = parquet.read(columns=wanted) if wanted else None
        paths: list[str | None] = [None] * rows
        kind = schema.field(column).type
        if rows and pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
            nested = parquet.read(columns=[f"{column}.path"]).column(0)  # the struct, with its path field only
            paths = pc.struct_field(nested, "path").to_pylist()
    found = {name: table.column(name) for name in wanted} if table is not None else {}
    return ImageParquetIndex(rows, column, found, paths)


def read_parquet_images(uri: str, column: str, rows: Sequence[int],
                        cache: dict | None = None) -> list[bytes | None]:
    """The image bytes of the given rows (row indices of the file), in the order given; None where null.

    Only the row groups holding these rows are read, and only the image column. With ``cache`` (a dict the caller
    keeps between calls), the last row group read of each file is kept with the file's row-group bounds, so
    consecutive small batches of one row group read it once and do not open the file again.

    Raises:
        storage.StorageError: The file cannot be opened or read.
    """
    def read() -> list[bytes | None]:
        kept = next(((k, v) for k, v in (cache or {}).items() if k[:2] == (uri, column)), None)
        bounds, group, col = (kept[1][0], kept[0][2], kept[1][1]) if kept else (None, -1, None)
        opened: list = []  # the file, once it must be read

        def parquet() -> pq.ParquetFile:
            if not opened:
                opened.extend(_open_parquet(uri))
            return opened[0]

        try:
            if bounds is None:
                meta = parquet().metadata
                bounds = list(itertools.accumulate((meta.row_group(g).num_rows for g in range(meta.num_row_groups)),
                                                   initial=0))
            values: dict[int, bytes | None] = {}
            for g in sorted({bisect.bisect_right(bounds, r) - 1 for r in rows}):
                if g != group:
                    group, col = g, parquet().read_row_group(g, columns=[column]).column(0)
                    if pa.types.is_struct(col.type):
                        col = pc.struct_field(col, "bytes")
                for r in rows:
                    if bounds[g] <= r < bounds[g + 1]:
                        values[r] = col[r - bounds[g]].as_py()
        finally:
            if opened:
                opened[1].close()
        if cache is not None:
            if kept:
                del cache[kept[0]]
            cache[(uri, column, group)] = (bounds, col)
        return [values[r] for r in rows]

    try:
        return storage.retry_io(read, uri)
    except (OSError, pa.ArrowInvalid) as exc:
        raise storage.StorageError(f"{uri}: {exc}") from exc
