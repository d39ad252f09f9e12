"""Planning a collection into *parts*: the unit of work, of output and of resume of the parts layout.

A collection is planned once, into ``OUTPUT/_parts/``::

    units/unit-<u>.parquet   one index per unit, written by a planning task: a WebDataset tar, a Parquet file
                             with image bytes, a manifest, or one listing. Columns: ``uri`` (the input's
                             locator: a path, an s3:// URI, an http(s) URL, ``<tar>#<member>`` or
                             ``<parquet>#<row>``), ``container``, ``offset``, ``size``, [``id``], then the
                             pass-through columns (tar: ``key``, ``json``, ``txt``; a manifest's or Parquet
                             file's own columns, as the config names them)
    plan.json                the units (file, rows, kind, image column), the parts as slices of units, the
                             schema of the id and pass-through columns, and a digest of the inputs

A part is ``[(unit, lo, hi), ...]``: consecutive rows of consecutive units, ``part_rows`` rows (the last one
fewer); rows of a part are numbered 0..n-1 in plan order. Containers are indexed in parallel (Ray tasks when
Ray is initialised, threads otherwise); the driver holds per-unit counts and the part slices only, never
rows. A rerun with the same inputs reuses the plan (part ids are stable); other inputs are refused.

What planning does not do (the table layout of :mod:`cskd_ray.io.sources` does): weights (every source is
taken whole, in order) and seeded samples (``max_images`` takes the first images in plan order). A folder or
prefix of loose files is listed one level deep on the driver; its files are one unit and each subfolder
another, so the subfolders are listed in parallel (a flat prefix of millions of files is still one listing).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cskd_ray.io import storage
from cskd_ray.io.containers import ContainerError, index_image_parquet, index_tar
from cskd_ray.io.sources import URI_COLUMNS, SourceConfig, SourceError, manifest_folder, resolve_entry

PLAN_FOLDER = "_parts"
PLAN_FILE = "plan.json"
TAR_COLUMNS = ("key", "json", "txt")  # kept from every WebDataset sample
INDEX_COLUMNS = ("uri", "container", "offset", "size")
# Names a pass-through column cannot take: the index's, the pass's and the result tables' own columns.
RESERVED_COLUMNS = frozenset({*INDEX_COLUMNS, "unit", "part", "row", "rep", "deferred", "id", "sha256", "score",
                              "distribution", "model", "error", "feature", "tokens", "image", "pixels"})


def check_columns(columns: Sequence[str]) -> None:
    """Refuse pass-through columns named like a column the output already has (they would replace it).

    Raises:
        SourceError: Names the clashing columns.
    """
    clash = sorted(set(columns) & RESERVED_COLUMNS)
    if clash:
        raise SourceError(f"columns {clash}: these names are the output's own columns; reserved: "
                          f"{sorted(RESERVED_COLUMNS)}")


@dataclass(frozen=True)
class Unit:
    """One thing a planning task indexes: a container, a manifest or a listing."""

    kind: str  # "tar" | "image_parquet" | "manifest" | "listing" (recursive) | "listing_top" (one folder level)
    uri: str
    source: int
    image_column: str | None = None
    bytes: int | None = None  # of a container or manifest file, to tell a changed input from the planned one


@dataclass
class PartsPlan:
    """A planned collection: the units' indexes and the parts as slices of them (see the module docstring)."""

    uri: str
    digest: str
    units: list[dict]
    parts: list[list[tuple[int, int, int]]]
    schema: pa.Schema  # id and pass-through columns
    stats: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Inputs in the plan."""
        return sum(self.part_rows(p) for p in range(len(self.parts)))

    def part_rows(self, part: int) -> int:
        """Inputs in one part."""
        return sum(hi - lo for _, lo, hi in self.parts[part])

    def to_json(self) -> str:
        """The plan as the text of ``plan.json``."""
        schema = base64.b64encode(self.schema.serialize().to_pybytes()).decode()
        return json.dumps({"version": 1, "digest": self.digest, "units": self.units,
                           "parts": [[list(s) for s in part] for part in self.parts], "schema": schema,
                           "columns": self.schema.names, "stats": self.stats})

    @classmethod
    def from_json(cls, uri: str, text: str) -> PartsPlan:
        """Read a plan written by :meth:`to_json`."""
        data = json.loads(text)
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["schema"])))
        return cls(uri, data["digest"], data["units"], [[tuple(s) for s in part] for part in data["parts"]],
                   schema, data.get("stats", {}))


def plan_uri(output: str) -> str:
    """Where the plan of an output lives."""
    return storage.join(output, PLAN_FOLDER)


def inputs_digest(sources: Sequence[SourceConfig], part_rows: int, max_images: int | None, id_column: str | None,
                  columns: Sequence[str]) -> str:
    """A digest of everything that shapes a plan; a rerun with another digest cannot reuse the plan."""
    blob = json.dumps({"sources": [s.model_dump(mode="json") for s in sources], "part_rows": part_rows,
                       "max_images": max_images, "id_column": id_column, "columns": list(columns)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_kind(source: SourceConfig) -> str:
    """What a source is: ``webdataset``, ``image_parquet``, ``manifest`` or ``listing``.

    ``auto`` resolves a ``.tar`` URI (file or glob) to ``webdataset``, a ``.parquet`` file without a ``uri`` /
    ``url`` column to ``image_parquet``, other ``.csv/.parquet/.txt`` files to ``manifest`` and the rest to
    ``listing``.
    """
    if source.kind != "auto":
        return source.kind
    lowered = source.uri.lower()
    if lowered.endswith(".tar"):
        return "webdataset"
    if lowered.endswith((".parquet", ".pq")):
        is_glob = any(c in source.uri for c in "*?[")
        try:
            first = next(iter(storage.list_files(source.uri))).uri if is_glob else source.uri
            fs, path = storage.resolve(first)
            with fs.open_input_file(path) as handle:
                names = pq.ParquetFile(handle).schema_arrow.names
        except (OSError, StopIteration, pa.ArrowInvalid):
            return "listing" if is_glob else "manifest"  # reading it as such reports the error
        if any(c in names for c in URI_COLUMNS):
            return "listing" if is_glob else "manifest"
        return "image_parquet"
    if lowered.endswith((".csv", ".txt")) and not any(c in source.uri for c in "*?["):
        return "manifest"
    return "listing"


def is_container_source(source: SourceConfig) -> bool:
    """Whether a source can only be read by the parts layout (WebDataset tars, Parquet with image bytes)."""
    return source_kind(source) in ("webdataset", "image_parquet")


def units_of(sources: Sequence[SourceConfig]) -> list[Unit]:
    """The units of every source, in order: one per tar / Parquet file, one per manifest or listing."""
    units = []
    for i, source in enumerate(sources):
        kind = source_kind(source)
        if kind in ("webdataset", "image_parquet"):
            suffix = (".tar",) if kind == "webdataset" else (".parquet", ".pq")
            try:
                files = list(storage.list_files(source.uri, suffix))
            except storage.StorageError as exc:
                raise SourceError(f"input {source.uri}: {exc}") from exc
            if not files:
                raise SourceError(f"input {source.uri}: holds no {' or '.join(suffix)} files")
            unit_kind = "tar" if kind == "webdataset" else "image_parquet"
            units += [Unit(unit_kind, f.uri, i, source.image_column, f.size) for f in files]
        elif kind == "manifest":
            try:
                size = next(iter(storage.list_files(source.uri))).size
            except storage.StorageError as exc:
                raise SourceError(f"manifest {source.uri}: {exc}") from exc
            units.append(Unit(kind, source.uri, i, bytes=size))
        else:
            units += listing_units(source, i)
    return units


def listing_units(source: SourceConfig, number: int) -> list[Unit]:
    """A folder / prefix is listed one level deep here; each subfolder becomes a unit listed by its own task.

    One recursive listing of a large prefix is a long chain of sequential requests (1,000 keys each on S3); its
    subfolders' listings run in parallel. A glob or a single file is one unit.

    Raises:
        SourceError: Nothing exists at the source's URI.
    """
    if any(c in source.uri for c in storage.GLOB_CHARS) or not storage.is_dir(source.uri):
        return [Unit("listing", source.uri, number)]
    try:
        files, folders = storage.list_top(source.uri, tuple(source.suffixes) if source.suffixes else None)
    except storage.StorageError as exc:
        raise SourceError(f"input {source.uri}: {exc}") from exc
    return ([Unit("listing_top", source.uri, number)] if files else []) + [
        Unit("listing", folder, number) for folder in folders]


def _manifest_table(uri: str) -> pa.Table:
    """A manifest with all its columns; the URI column is renamed ``uri`` and resolved against the folder."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise SourceError(f"manifest {uri}: {exc}") from exc
    if uri.lower().endswith(".txt"):
        lines = [line.strip() for line in data.decode("utf-8", errors="replace").splitlines()]
        table = pa.table({"uri": [line for line in lines if line and not line.startswith("#")]})
    else:
        try:
            if uri.lower().endswith(".csv"):  # every column as text: ids such as 000123 keep their zeros
                header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8", errors="replace")]), [])
                convert = pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()))
                table = pacsv.read_csv(io.BytesIO(data), convert_options=convert)
            else:
                table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"manifest {uri}: not a readable table: {exc}") from exc
        column = next((c for c in URI_COLUMNS if c in table.column_names), None)
        if column is None:
            raise SourceError(f"manifest {uri}: needs a 'uri' (or 'url') column; found {table.column_names}")
        table = table.drop([c for c in URI_COLUMNS if c in table.column_names and c != column])
        table = table.rename_columns(["uri" if c == column else c for c in table.column_names])
        table = table.filter(pc.is_valid(table.column("uri")))
    base = manifest_folder(uri)
    uris = pa.array([resolve_entry(base, str(v)) for v in table.column("uri").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("uri"), "uri", uris)


def _index(uris: list[str], container: str | None = None, offsets: Any = None, sizes: Any = None) -> pa.Table:
    """The index columns of a unit's rows (``container``, ``offset`` and ``size`` null for plain files)."""
    n = len(uris)
    return pa.table({"uri": pa.array(uris, pa.string()), "container": pa.array([container] * n, pa.string()),
                     "offset": pa.array(offsets if offsets is not None else [None] * n, pa.int64()),
                     "size": pa.array(sizes if sizes is not None else [None] * n, pa.int64())})


def index_unit(unit: Unit, source: SourceConfig, id_column: str | None,
               columns: Sequence[str]) -> tuple[pa.Table, str | None]:
    """The index of one unit (the module docstring's columns), with ``id`` and the named pass-through columns.

    Also returns the image column of a Parquet file with images (None for other units).

    Raises:
        SourceError: The unit cannot be read, or lacks ``id_column``.
    """
    image_column = None
    try:
        if unit.kind == "tar":
            found = index_tar(unit.uri)
            table = _index([f"{unit.uri}#{m}" for m in found.column("member").to_pylist()], unit.uri,
                           found.column("offset").to_pylist(), found.column("size").to_pylist())
            extra = found.select(list(TAR_COLUMNS))
        elif unit.kind == "image_parquet":
            wanted = [*([id_column] if id_column else []), *columns]
            found = index_image_parquet(unit.uri, unit.image_column, wanted)
            image_column, rows = found.image_column, found.rows
            table = _index([f"{unit.uri}#{i}" for i in range(rows)], unit.uri, range(rows), [0] * rows)
            extra = pa.table(found.columns) if found.columns else pa.table({"_row": pa.array(range(rows))})
        elif unit.kind == "manifest":
            found = _manifest_table(unit.uri)
            table = _index(found.column("uri").to_pylist())
            extra = found.drop(["uri"])
        else:
            suffixes = tuple(source.suffixes) if source.suffixes else None
            try:
                if unit.kind == "listing_top":
                    uris = [e.uri for e in storage.list_top(unit.uri, suffixes)[0]]
                else:
                    uris = [e.uri for e in storage.list_files(unit.uri, suffixes)]
            except storage.StorageError as exc:
                raise SourceError(f"input {source.uri}: {exc}") from exc
            table = _index(uris)
            extra = pa.table({"uri": table.column("uri")})  # a listing's only column
    except ContainerError as exc:
        raise SourceError(f"input {source.uri}: {exc}") from None
    if source.suffixes and unit.kind == "manifest":
        keep = pc.match_substring_regex(
            pc.utf8_lower(table.column("uri")), "(" + "|".join(s.lower().replace(".", r"\.")
                                                                       for s in source.suffixes) + ")$")
        table, extra = table.filter(keep), extra.filter(keep)
    if id_column is not None:
        if id_column not in extra.column_names:
            raise SourceError(f"input {unit.uri}: no id column {id_column!r}; columns: {extra.column_names}")
        table = table.append_column("id", extra.column(id_column))
    wanted = [*(TAR_COLUMNS if unit.kind == "tar" else ()), *columns]
    for name in dict.fromkeys(wanted):
        if name in extra.column_names and name not in table.column_names:
            table = table.append_column(name, extra.column(name))
    return table, image_column


def _write_unit_index(plan: str, number: int, unit: Unit, source: SourceConfig, id_column: str | None,
                      columns: Sequence[str], part_rows: int) -> dict:
    """Planning task: index one unit, write ``units/unit-<n>.parquet``, return its entry of ``plan.json``."""
    table, image_column = index_unit(unit, source, id_column, columns)
    name = f"units/unit-{number:06d}.parquet"
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(part_rows, 16384)))
    storage.write_bytes_once(storage.join(plan, name), sink.getvalue(), overwrite=True)
    extra = table.schema.remove(0).remove(0).remove(0).remove(0)
    return {"file": name, "rows": len(table), "kind": unit.kind, "uri": unit.uri, "source": unit.source,
            "bytes": unit.bytes, "image_column": image_column,
            "schema": base64.b64encode(extra.serialize().to_pybytes()).decode()}


def _map(function: Callable, items: list, parallel: int) -> list:
    """``function(*item)`` for every item, in Ray tasks when Ray is initialised, else in threads; in order."""
    try:
        import ray
        use_ray = ray.is_initialized()
    except ImportError:  # pragma: no cover - ray is a dependency
        use_ray = False
    if use_ray:
        remote = ray.remote(num_cpus=0.5, max_retries=3)(function)
        results, pending = [], []
        try:
            for item in items:
                pending.append(remote.remote(*item))
                if len(pending) >= parallel:
                    results.append(ray.get(pending.pop(0)))
            return results + ray.get(pending)
        except ray.exceptions.RayTaskError as exc:  # the task's own error, without Ray's remote traceback
            if isinstance(exc.cause, SourceError):
                raise SourceError(str(exc.cause)) from None
            raise
    with ThreadPoolExecutor(max_workers=min(parallel, 8)) as pool:
        return list(pool.map(lambda item: function(*item), items))


def plan_parts(sources: Sequence[SourceConfig], output: str, part_rows: int, max_images: int | None = None,
               id_column: str | None = None, columns: Sequence[str] = (), parallel: int = 16,
               progress: Callable[[str], None] | None = None) -> PartsPlan:
    """Plan ``sources`` into parts under ``OUTPUT/_parts`` (or reuse the plan already there).

    Raises:
        SourceError: A source cannot be read, a unit lacks ``id_column``, or the output was planned for other
            inputs.
        ValueError: A source has a weight other than 1 (mixing by weight is the table layout's).
    """
    check_sources_for_parts(sources, columns)
    digest = inputs_digest(sources, part_rows, max_images, id_column, columns)
    folder = plan_uri(output)
    existing = load_plan(output)
    units = units_of(sources)
    if existing is not None:
        if existing.digest != digest:
            raise SourceError(f"output {output} was planned for other inputs (plan {existing.digest}, these inputs "
                              f"{digest}: sources, part_rows, max_images, id_column or columns differ) and holds "
                              "their rows; use a new output")
        _check_unchanged(existing, units, output)
        return existing
    if storage.exists(storage.join(output, "_commits")):
        raise SourceError(f"output {output} holds committed parts but no plan ({PLAN_FOLDER}/{PLAN_FILE}); use a new "
                          "output")
    if progress:
        progress(f"plan: indexing {len(units)} units ({sum(u.kind == 'tar' for u in units)} tars, "
                 f"{sum(u.kind == 'image_parquet' for u in units)} Parquet files with images)")
    entries = _map(_write_unit_index, [(folder, n, u, sources[u.source], id_column, list(columns), part_rows)
                                       for n, u in enumerate(units)], parallel)
    schemas = [pa.ipc.read_schema(pa.py_buffer(base64.b64decode(e.pop("schema")))) for e in entries]
    for i, source in enumerate(sources):
        if not any(e["rows"] for e in entries if e["source"] == i):
            ending = f" ending with {source.suffixes}" if source.suffixes else ""
            raise SourceError(f"input {source.uri}: holds no files{ending}")
    schema = _unified_schema(schemas, id_column, columns, sources, units)
    parts = _slice_into_parts(entries, sources, part_rows, max_images)
    plan = PartsPlan(folder, digest, entries, parts, schema,
                     {"units": len(entries), "rows": sum(hi - lo for p in parts for _, lo, hi in p)})
    storage.write_text_once(storage.join(folder, PLAN_FILE), plan.to_json(), overwrite=True)
    return plan


def check_sources_for_parts(sources: Sequence[SourceConfig], columns: Sequence[str] = ()) -> None:
    """What the parts layout refuses before reading anything: weights, and pass-through names it reserves.

    Raises:
        SourceError: Names the key (``input.<i>.weight``, ``columns``) and why.
    """
    for i, source in enumerate(sources):
        if source.weight != 1.0:
            raise SourceError(f"input.{i}.weight: the parts layout takes every source whole, in order; mixing by "
                              "weight is the table layout's (layout: table)")
    check_columns(columns)


def _check_unchanged(plan: PartsPlan, units: list[Unit], output: str) -> None:
    """Refuse a plan whose containers or manifests were added, removed or rewritten since it was made.

    A listing of loose files is not compared (it would mean listing it again, row by row).
    """
    planned = [(e["uri"], e.get("bytes")) for e in plan.units if not e["kind"].startswith("listing")]
    current = [(u.uri, u.bytes) for u in units if not u.kind.startswith("listing")]
    if planned != current:
        added = sorted({uri for uri, _ in current} - {uri for uri, _ in planned})
        changed = sorted(uri for uri, size in set(current) - set(planned) if uri not in added)
        raise SourceError(f"the inputs of {output} changed since they were planned ({len(added)} files added, e.g. "
                          f"{added[:2]}; {len(changed)} rewritten or removed, e.g. {changed[:2]}); planned parts would "
                          "read the wrong bytes: score them into a new output")


def _unified_schema(schemas: list[pa.Schema], id_column: str | None, columns: Sequence[str],
                    sources: Sequence[SourceConfig], units: list[Unit]) -> pa.Schema:
    """One schema for every part's id and pass-through columns (types promoted, e.g. int → double)."""
    wanted = list(dict.fromkeys(["id"] * (id_column is not None) + [
        *(TAR_COLUMNS if any(u.kind == "tar" for u in units) else ()), *columns]))
    found: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            if f.name in wanted:
                found.setdefault(f.name, []).append(f.type)
    missing = [c for c in columns if c not in found]
    if missing:
        raise SourceError(f"columns {missing}: in no input (inputs: {[s.uri for s in sources]})")
    fields = []
    for name in wanted:
        types = [t for t in found[name] if not pa.types.is_null(t)] or [pa.string()]
        try:
            unified = pa.unify_schemas([pa.schema([(name, t)]) for t in types], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            raise SourceError(f"column {name!r} has types that do not mix across inputs: "
                              f"{sorted({str(t) for t in types})}; give it one type in every input") from None
        fields.append(unified.field(name))
    return pa.schema(fields)


def _slice_into_parts(entries: list[dict], sources: Sequence[SourceConfig], part_rows: int,
                      max_images: int | None) -> list[list[tuple[int, int, int]]]:
    """Cut the units' rows, in order, into parts of ``part_rows`` (caps: per source, then overall)."""
    taken = [0] * len(sources)
    total = 0
    parts: list[list[tuple[int, int, int]]] = [[]]
    room = part_rows
    for u, entry in enumerate(entries):
        cap = sources[entry["source"]].max_images
        rows = entry["rows"] if cap is None else max(0, min(entry["rows"], cap - taken[entry["source"]]))
        if max_images is not None:
            rows = max(0, min(rows, max_images - total))
        taken[entry["source"]] += rows
        total += rows
        lo = 0
        while lo < rows:
            step = min(room, rows - lo)
            parts[-1].append((u, lo, lo + step))
            lo += step
            room -= step
            if room == 0:
                parts.append([])
                room = part_rows
    return [p for p in parts if p]


def load_plan(output: str) -> PartsPlan | None:
    """The plan of ``output``, or None when it has none."""
    uri = storage.join(plan_uri(output), PLAN_FILE)
    if not storage.exists(uri):
        return None
    return PartsPlan.from_json(plan_uri(output), storage.read_text(uri))


def read_part(plan: PartsPlan, part: int) -> pa.Table:
    """The rows of one part: ``part``, ``row`` (0..n-1), ``unit``, the index columns, then the plan's columns."""
    tables = []
    for unit, lo, hi in plan.parts[part]:
        uri = storage.join(plan.uri, plan.units[unit]["file"])
        fs, path = storage.resolve(uri)

        def read(fs: pafs.FileSystem = fs, path: str = path, lo: int = lo, hi: int = hi) -> pa.Table:
            with fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                starts, total, groups = [], 0, []
                for g in range(parquet.metadata.num_row_groups):
                    n = parquet.metadata.row_group(g).num_rows
                    if total < hi and total + n > lo:
                        groups.append(g)
                        starts.append(total)
                    total += n
                table = parquet.read_row_groups(groups)
                return table.slice(lo - starts[0], hi - lo) if groups else table.slice(0, 0)

        table = storage.retry_io(read, uri)
        columns = {name: table.column(name) for name in INDEX_COLUMNS}
        for f in plan.schema:
            columns[f.name] = (table.column(f.name).cast(f.type) if f.name in table.column_names
                               else pa.nulls(len(table), f.type))
        table = pa.table(columns)
        tables.append(table.add_column(0, "unit", pa.array([unit] * len(table), pa.int32())))
    out = pa.concat_tables(tables)
    out = out.add_column(0, "row", pa.array(range(len(out)), pa.int32()))
    return out.add_column(0, "part", pa.array([part] * len(out), pa.int32()))
