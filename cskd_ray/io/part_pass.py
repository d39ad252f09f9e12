"""The image pass of the parts layout: every part read, computed, written and committed off the driver.

Per pending part (one with no commit marker), all in Ray tasks and actors:

1. a read task reads the part's rows from the plan (:func:`cskd_ray.io.parts.read_part`), reads their bytes
   (threaded GETs for files and URLs, coalesced ranged reads inside tars, row-group reads of Parquet image
   columns), hashes them, and decodes and resizes each content once: a row whose content appeared earlier in
   the part is *deferred* to that first row (``rep``);
2. the stage's model actors (``ScoreActor``) compute the rows and carry ``part``, ``row`` and ``rep`` through;
3. a writer task writes each block's rows of each part to ``OUTPUT/_attempts/part-<p>/<uuid>.parquet`` and
   returns only ``(part, file, rows, sources)`` (sources: the other parts computing some of those rows' contents);
4. when the driver has been told of all rows of a part, a commit task joins the part's rows to its plan rows
   (the id and pass-through columns), fills deferred rows from their ``rep``, writes ``OUTPUT/part-<p>.parquet``
   (a deterministic name, overwritten by a redo), its keys ``OUTPUT/_digests/part-<p>.parquet``, and then the marker
   ``OUTPUT/_commits/part-<p>.json`` (rows, errors, rows computed and copied, file size and sha256), and deletes
   the attempt's files.

The driver holds part ids, per-part file lists of the parts in flight and counters: nothing per row. Readers
(:class:`cskd_ray.io.feature_cache.ResultTable`) list ``part-*.parquet``; a part file exists only complete (written
atomically), and a rerun redoes exactly the parts without a marker. Files of an attempt that died are never
read (the commit reads only the files the driver was told of) and are left under ``_attempts``.

Identical content is computed once per output: within a part by the read task itself, across parts and across runs
through the content index (:mod:`cskd_ray.io.content_index`, range-partitioned actors; no global set anywhere).
A row whose content another part computes is not decoded; its commit copies that part's result, from the part's
attempt files while it is in flight or its committed table. Each committed part also writes its contents' keys
to ``_digests/part-<p>.parquet`` (before its marker), which the next run's index loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cskd_ray.io import storage
from cskd_ray.io.containers import read_parquet_images, read_ranges
from cskd_ray.io.content_index import (
    NO_SOURCE,
    ContentIndexShard,
    claim_rows,
    shards_for,
    split_locator,
    write_part_digests,
)
from cskd_ray.io.fetch import read_many
from cskd_ray.io.parts import PartsPlan, read_part
from cskd_ray.io.read_tasks import decode_rows, hash_reads
from cskd_ray.io.transforms import PreprocessSpec

COMMITS = "_commits"
ATTEMPTS = "_attempts"
CARRIED = ("part", "row", "src", "rep")  # columns the model actors pass through
BLOCK_BYTES = 32 << 20  # the table layout's bound on a read task's output block, too
CLAIM_ROWS = 256  # rows read, hashed and sent to the content index at once (one round trip per shard)


def part_file(output: str, part: int) -> str:
    """The committed table file of a part."""
    return storage.join(output, f"part-{part:06d}.parquet")


def marker_uri(output: str, part: int) -> str:
    """The commit marker of a part."""
    return storage.join(output, COMMITS, f"part-{part:06d}.json")


def committed_parts(output: str) -> set[int]:
    """The parts of ``output`` that have a commit marker (one listing; the markers themselves are not read)."""
    folder = storage.join(output, COMMITS)
    if not storage.exists(folder):
        return set()
    names = (entry.uri.rsplit("/", 1)[-1] for entry in storage.list_files(folder, (".json",)))
    return {int(name[len("part-"):-len(".json")]) for name in names if name.startswith("part-")}


def read_marker(output: str, part: int) -> dict:
    """One part's commit marker: ``part, plan, rows, errors, deduplicated, file, bytes, sha256[, summary]``."""
    return json.loads(storage.read_text(marker_uri(output, part)))


def read_markers(output: str, parts: Iterable[int], threads: int = 32) -> Iterator[dict]:
    """The markers of ``parts``, in order, read ``threads`` at a time (object-store GETs are latency-bound)."""
    parts = list(parts)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(parts)))) as pool:
        yield from pool.map(lambda part: read_marker(output, part), parts)


def read_inputs(rows: pa.Table, plan: PartsPlan, threads: int, cache: dict | None = None) -> list[bytes | Exception]:
    """The bytes of each row of a part (or the exception that stopped its read), in row order.

    ``cache`` keeps the last Parquet row group read of each file between calls (consecutive chunks of one part).
    """
    uris = rows.column("uri").to_pylist()
    containers = rows.column("container").to_pylist()
    out: list[bytes | Exception] = [b""] * len(uris)
    plain = [i for i, c in enumerate(containers) if c is None]
    for i, data in zip(plain, read_many([uris[i] for i in plain], threads, storage.read_bytes), strict=True):
        out[i] = data
    by_unit: dict[int, list[int]] = {}
    for i, (unit, container) in enumerate(zip(rows.column("unit").to_pylist(), containers, strict=True)):
        if container is not None:
            by_unit.setdefault(unit, []).append(i)
    offsets, sizes = rows.column("offset").to_pylist(), rows.column("size").to_pylist()
    for unit, members in by_unit.items():
        entry = plan.units[unit]
        try:
            if entry["kind"] == "tar":
                found: list = read_ranges(entry["uri"], [(offsets[i], sizes[i]) for i in members])
            else:
                found = read_parquet_images(entry["uri"], entry["image_column"], [offsets[i] for i in members], cache)
        except Exception as exc:  # noqa: BLE001 - a container that cannot be read gives error rows, not a crash
            found = [exc] * len(members)
        for i, data in zip(members, found, strict=True):
            out[i] = ValueError("no image bytes (null)") if data is None else data
    return out


def read_part_batches(batch: dict[str, np.ndarray], plan: PartsPlan, spec: dict, max_pixels: int, read_threads: int,
                      chunk_rows: int, index: list | None = None, pack_size: int = 0) -> Iterator[dict]:
    """Ray Data task: for each part id of the batch, yield its rows in chunks of ``chunk_rows``, read and decoded.

    Yields columns ``part``, ``row``, ``uri``, ``sha256`` (``""`` if unreadable), ``pixels`` (N, S, S, 3) uint8,
    ``error`` (``""`` when fine), ``deferred``, and ``src``/``rep``: the part and row this row takes its result
    from (itself when it is not deferred; a first row of the part when deferred inside it, which may in turn
    copy another part). A content met earlier in the part is deferred to its first row there;
    with an ``index`` (:class:`cskd_ray.io.content_index.ContentIndexShard` handles), a content another part
    computes, in this run or a committed one, is deferred to that part's row and not decoded. With ``pack_size``
    > 0 also ``image``: each computed row's packed training image (:mod:`cskd_ray.io.packing`; ``b""`` for the
    others). No input raises.
    """
    preprocess = PreprocessSpec.from_dict(spec)
    for part in batch["part"]:
        part = int(part)
        rows = read_part(plan, part)
        first_row: dict[str, int] = {}
        row_groups: dict = {}
        group_rows = max(chunk_rows, CLAIM_ROWS)  # read, hashed and claimed together; decoded per chunk
        for lo in range(0, len(rows), group_rows):
            group = rows.slice(lo, group_rows)
            n = len(group)
            contents, digests, errors = hash_reads(read_inputs(group, plan, read_threads, row_groups))
            rep = np.array([first_row.setdefault(d, lo + i) if d else lo + i for i, d in enumerate(digests)],
                           dtype=np.int32)
            own = np.arange(lo, lo + n, dtype=np.int32)
            src = np.full(n, part, dtype=np.int32)
            firsts = [i for i in range(n) if digests[i] and rep[i] == own[i]]
            if index and firsts:
                sources = claim_rows(index, part, [lo + i for i in firsts], [digests[i] for i in firsts])
                for i, source in zip(firsts, sources, strict=True):
                    if source != NO_SOURCE and split_locator(source)[0] != part:  # a locator in this part is
                        src[i], rep[i] = split_locator(source)  # an earlier attempt's (other rows read): compute
            computes = (src == part) & (rep == own) & np.array([bool(d) for d in digests], dtype=bool)
            uris = np.array(group.column("uri").to_pylist(), dtype=str)
            for a in range(0, n, chunk_rows):
                b = min(n, a + chunk_rows)
                chunk_errors = errors[a:b]
                packed = [b""] * (b - a) if pack_size > 0 else None
                pixels = decode_rows(contents[a:b], [i - a for i in range(a, b) if computes[i]], chunk_errors,
                                     preprocess, max_pixels, packed, pack_size)
                out = {"part": np.full(b - a, part, dtype=np.int32), "row": own[a:b], "uri": uris[a:b],
                       "sha256": np.array(digests[a:b], dtype=str), "pixels": pixels,
                       "error": np.array(chunk_errors, dtype=str),
                       "deferred": (rep[a:b] != own[a:b]) | (src[a:b] != part), "src": src[a:b], "rep": rep[a:b]}
                if packed is not None:
                    out["image"] = np.array(packed, dtype=object)
                yield out
            del contents


def write_part_chunks(batch: pa.Table, output: str) -> pa.Table:
    """Ray Data task: write the block's rows of each part under ``_attempts``; return ``part, file, rows, sources``.

    ``rows`` lists the row ids written (the driver marks them off per part: a row delivered twice, by a retried
    task, is counted once); ``sources`` the other parts whose rows compute some of these rows' contents.
    """
    parts, files, written, sources = [], [], [], []
    for part in pc.unique(batch.column("part")).to_pylist():
        rows = batch.filter(pc.equal(batch.column("part"), part))
        sink = io.BytesIO()
        pq.write_table(rows, sink, compression="zstd")
        uri = storage.join(output, ATTEMPTS, f"part-{part:06d}", f"{uuid.uuid4().hex}.parquet")
        storage.write_bytes_once(uri, sink.getvalue())
        parts.append(part)
        files.append(uri)
        written.append(rows.column("row").combine_chunks())
        sources.append([p for p in pc.unique(rows.column("src")).to_pylist() if p != part])
    return pa.table({"part": pa.array(parts, pa.int32()), "file": pa.array(files, pa.string()),
                     "rows": pa.array([r.to_pylist() for r in written], pa.list_(pa.int32())),
                     "sources": pa.array(sources, pa.list_(pa.int32()))})


def read_attempt_rows(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """The rows of a part's attempt files (``columns``, default all), sorted by row, one copy of each.

    A row delivered twice (a retried task whose first output was kept too) appears once.
    """
    table = pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(f)), columns=columns)
                              for f in files]).sort_by("row")
    if len(table) > 1:
        rows = table.column("row").to_numpy()
        table = table.filter(pa.array(np.concatenate([[True], rows[1:] != rows[:-1]])))
    return table


def read_source_part(output: str, part: int, files: list[str] | None, names: list[str]) -> pa.Table:
    """Columns ``names`` of every row of ``part``, in row order, resolved inside the part, plus ``usable``.

    Read from its attempt files while it is not committed (``files``), else (or when its commit has meanwhile
    replaced them) from its committed table. A row deferred to another row of the part gets that row's result;
    ``usable`` is false where the result is not computed there (a row copying a third part, which a retried read
    task can produce).
    """
    if files is not None:
        try:
            table = read_attempt_rows(files, [*names, "row", "deferred", "src", "rep"])
            src, rep = table.column("src").to_numpy(), table.column("rep").to_numpy().astype(np.int64)
            take = np.where(src == part, rep, np.arange(len(table)))
            table = table.take(pa.array(take))
            usable = pc.invert(table.column("deferred"))
            return table.select(names).append_column("usable", usable)
        except storage.StorageError:  # committed meanwhile? Its commit writes the table before deleting these
            if not storage.exists(part_file(output, part)):
                raise
    fs, path = storage.resolve(part_file(output, part))
    table = pq.read_table(path, filesystem=fs, columns=names)
    return table.append_column("usable", pa.array(np.ones(len(table), dtype=bool)))


def commit_part(output: str, plan: PartsPlan, part: int, files: list[str], result_schema: pa.Schema,
                summarize: Callable[[pa.Table], dict] | None = None,
                sources: dict[int, list[str] | None] | None = None) -> dict:
    """Ray task: assemble the part's table from its chunk files and plan rows, write it, its digests, its marker.

    ``summarize`` (the stage's, e.g. score's counts and histogram) is stored in the marker as ``summary``, so
    a summary of the whole output is a merge of the markers', not a read of every row. ``sources`` gives, for each
    other part computing some of this part's contents, its attempt files (``None``: read its committed table).

    Raises:
        RuntimeError: The chunks do not hold each row of the part exactly once, a source part is missing, or a
            row's result would not be its content's (see :func:`_resolve_results`); nothing is committed.
    """
    if storage.exists(marker_uri(output, part)):  # a retried commit whose first attempt got this far
        return read_marker(output, part)
    chunks = read_attempt_rows(files)
    expected = plan.part_rows(part)
    if chunks.column("row").to_pylist() != list(range(expected)):
        raise RuntimeError(f"part {part}: the attempt's files hold {len(chunks)} rows, not rows 0..{expected - 1} "
                           "once each; nothing committed (a rerun redoes the part)")
    names = [f.name for f in result_schema if f.name != "uri"]
    results = _resolve_results(output, part, chunks, names, sources or {})
    planned = read_part(plan, part)
    columns = {"uri": planned.column("uri")}
    for f in result_schema:
        if f.name != "uri":
            columns[f.name] = results.column(f.name).cast(f.type)
    columns["part"], columns["row"] = planned.column("part"), planned.column("row")
    for f in plan.schema:
        columns[f.name] = planned.column(f.name)
    table = pa.table(columns)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(len(table), 8192)))
    data = sink.getvalue()
    storage.write_bytes_once(part_file(output, part), data, overwrite=True)
    computed = pc.and_(pc.invert(chunks.column("deferred")), pc.is_valid(chunks.column("sha256")))
    # every content of the part, at its first row (computed here or copied from another part: both hold the result)
    first = pc.or_(pc.not_equal(chunks.column("src"), part), pc.equal(chunks.column("rep"), chunks.column("row")))
    write_part_digests(output, part, pc.filter(chunks.column("sha256"), first).to_pylist(),
                       pc.filter(chunks.column("row"), first).to_pylist())
    reused = int(pc.sum(pc.not_equal(chunks.column("src"), part)).as_py() or 0)
    marker = {"part": part, "plan": plan.digest, "rows": len(table),
              "errors": len(table) - table.column("error").null_count,
              "computed": int(pc.sum(computed).as_py() or 0),
              "deduplicated": int(pc.sum(chunks.column("deferred")).as_py() or 0), "from_other_parts": reused,
              "file": part_file(output, part).rsplit("/", 1)[-1], "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest()}
    if summarize is not None:
        marker["summary"] = summarize(table)
    storage.write_text_once(marker_uri(output, part), json.dumps(marker), overwrite=True)
    delete_quietly(files)
    return marker


def _resolve_results(output: str, part: int, chunks: pa.Table, names: list[str],
                     sources: dict[int, list[str] | None]) -> pa.Table:
    """Columns ``names`` of each row of ``chunks`` (sorted by row, one each), resolved to computed results.

    A row's result is its own, or that of the row computing its content: in this part (``rep``) or in another
    (``src``, ``rep``).

    Raises:
        RuntimeError: A source part is missing, or a row would get a result that is not its content's computed
            result (rows delivered by different attempts of a retried read task that read other rows): nothing
            is committed, and a rerun redoes the part.
    """
    src = chunks.column("src").to_numpy()
    rep = chunks.column("rep").to_numpy().astype(np.int64)
    pool = [chunks.select(names).append_column("usable", pc.invert(chunks.column("deferred")))]
    take = np.arange(len(chunks), dtype=np.int64)
    offset = len(chunks)
    for other in sorted(set(src.tolist()) - {part}):
        if other not in sources:
            raise RuntimeError(f"part {part}: rows copy part {other}'s results, which the commit was not given")
        table = read_source_part(output, other, sources[other], names)
        here = np.flatnonzero(src == other)
        if rep[here].max() >= len(table):
            raise RuntimeError(f"part {part}: part {other} has {len(table)} rows, not row {rep[here].max()}")
        take[here] = offset + rep[here]
        pool.append(table.cast(pool[0].schema))
        offset += len(table)
    inside = np.flatnonzero((src == part) & (rep != np.arange(len(chunks))))
    take[inside] = take[rep[inside]]  # a first row of the part is never deferred inside it: its entry is final
    results = pa.concat_tables(pool).take(pa.array(take))
    own = chunks.column("sha256")
    wrong = pc.and_(pc.is_valid(own), pc.or_(pc.invert(results.column("usable")),
                                            pc.fill_null(pc.not_equal(results.column("sha256"), own), True)))
    if pc.any(wrong).as_py():
        row = pc.index(wrong, True).as_py()
        raise RuntimeError(f"part {part}: row {row}'s content has no computed result among the rows delivered "
                           "(a retried read task read other rows); nothing committed, a rerun redoes the part")
    return results.drop(["usable"])


def delete_quietly(uris: list[str]) -> None:
    """Delete attempt files; one that cannot be deleted is left (it is never read)."""
    for uri in uris:
        fs, path = storage.resolve(uri)
        try:
            fs.delete_file(path)
        except OSError:
            pass


def dead_attempt_files(output: str, committed: set[int]) -> list[str]:
    """Files under ``_attempts`` of parts already committed: left by attempts that died (never read)."""
    folder = storage.join(output, ATTEMPTS)
    if not committed or not storage.exists(folder):
        return []
    found = []
    for entry in storage.list_files(folder, (".parquet",)):
        name = entry.uri.rsplit("/", 2)[-2]  # part-<p>
        if name.startswith("part-") and name[5:].isdigit() and int(name[5:]) in committed:
            found.append(entry.uri)
    return found


@dataclass
class PartsRunResult:
    """What a parts pass did."""

    parts: int
    parts_done_before: int
    parts_run: int
    rows: int
    rows_done_before: int
    new_rows: int
    deduplicated: int
    errors: int
    computed: int = 0  # contents decoded and run through the model (failed decodes included)


class _Progress:
    """One line at most every 5 s: rows and parts done, rate, errors."""

    def __init__(self, stage: str, total_rows: int, total_parts: int, progress: Callable[[str], None]) -> None:
        self.stage, self.total_rows, self.total_parts, self.progress = stage, total_rows, total_parts, progress
        self.rows = self.parts = self.errors = 0
        self.start = self.last = time.perf_counter()
        self.reported = (-1, -1)

    def report(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.reported == (self.rows, self.parts) or (not force and now - self.last < 5):
            return
        self.last, self.reported = now, (self.rows, self.parts)
        rate = self.rows / max(now - self.start, 1e-9)
        self.progress(f"{self.stage}: {self.rows}/{self.total_rows} rows, {self.parts}/{self.total_parts} parts "
                      f"committed, {rate:.1f} img/s, {self.errors} errors")


def run_parts(plan: PartsPlan, output: str, result_schema: pa.Schema, preprocess: PreprocessSpec, actor_cls: type,
              actor_kwargs: dict, options: Any, stage: str, progress: Callable[[str], None],
              summarize: Callable[[pa.Table], dict] | None = None, index_shards: int | None = None,
              pack_size: int = 0) -> PartsRunResult:
    """Compute and commit every part of ``plan`` that ``output`` has no marker for. Ray must be initialised.

    ``options`` is a :class:`cskd_ray.io.row_pipeline.PipelineOptions`; ``summarize`` goes to
    :func:`commit_part`. Content is computed once across parts and runs through ``index_shards`` content-index
    actors (default :func:`cskd_ray.io.content_index.shards_for` the plan's rows; 0 turns the index off: each
    content is then computed once per part). ``pack_size`` > 0 has the read tasks give the actors each computed
    row's packed training image (column ``image``, for the features stage).

    A part whose rows copy another part's results is committed once that part's rows are all written (from its
    attempt files, or its table once committed); it never waits for the other part's *commit*, so two parts that
    copy from each other cannot wait on each other.

    Raises:
        RuntimeError: A part could not be committed (its error says why; a rerun redoes it).
    """
    import ray

    done = committed_parts(output)
    delete_quietly(dead_attempt_files(output, done))
    pending = [p for p in range(len(plan.parts)) if p not in done]
    rows_before = sum(plan.part_rows(p) for p in done if p < len(plan.parts))
    total_new = sum(plan.part_rows(p) for p in pending)
    progress(f"{stage}: {plan.rows} inputs in {len(plan.parts)} parts, {len(done)} parts committed, "
             f"{len(pending)} to do ({total_new} rows)")
    result = PartsRunResult(len(plan.parts), len(done), 0, plan.rows, rows_before, 0, 0, 0)
    if not pending:
        return result
    gpus = options.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    shards = shards_for(plan.rows) if index_shards is None else index_shards
    index_actor = ray.remote(num_cpus=0, max_restarts=0)(ContentIndexShard)
    index = [index_actor.remote(output, sorted(done), k, shards) for k in range(shards)]
    ds = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=min(len(pending), 1024))
    ds = ds.map_batches(read_part_batches, batch_size=1, batch_format="numpy", num_cpus=options.decode_num_cpus,
                        fn_kwargs={"plan": plan, "spec": preprocess.to_dict(), "max_pixels": options.max_pixels,
                                   "read_threads": options.read_threads, "chunk_rows": options.decode_batch_size,
                                   "index": index, "pack_size": pack_size})
    ds = ds.map_batches(
        actor_cls, batch_size=options.batch_size, batch_format="numpy",
        fn_constructor_kwargs={**actor_kwargs, "device": "cuda" if gpus > 0 else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=options.concurrency), num_cpus=options.num_cpus_per_actor,
        num_gpus=gpus,
    )
    ds = ds.map_batches(write_part_chunks, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs={"output": output})
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=options.object_store_mb << 20)
    # A read task's output (a whole part) is cut into blocks of about 32 MiB of pixels. Ray Data's default (128 MiB)
    # would hand the actors a part of small images as one block, after it is all decoded: no overlap of decoding
    # and compute (50k images ran at 0.68x of the table layout's rate; see docs/benchmarks.md).
    ds.context.target_max_block_size = BLOCK_BYTES
    commit = ray.remote(num_cpus=0.25, max_retries=3)(commit_part)
    plan_ref = ray.put(plan)  # shipped once, not with every commit
    files: dict[int, list[str]] = {}
    seen: dict[int, np.ndarray] = {}  # per part in flight: which of its rows were written (a bitmap, not rows)
    needs: dict[int, set[int]] = {}  # per part in flight: the other parts computing some of its contents
    written: dict[int, list[str]] = {}  # parts whose rows are all written: their attempt files, until committed
    waiting: list[int] = []  # parts written, whose commit waits for a source part's rows
    committed = set(done)
    in_flight: dict = {}  # commit ref -> part
    failed: dict[int, str] = {}
    meter = _Progress(stage, total_new, len(pending), progress)

    def collect(refs: list) -> None:
        for ref in refs:
            part = in_flight.pop(ref)
            try:
                marker = ray.get(ref)
            except ray.exceptions.RayError as exc:  # one part failing does not stop the others
                failed[part] = str(getattr(exc, "cause", None) or exc).splitlines()[0]
                continue
            committed.add(part)
            written.pop(part, None)
            meter.parts += 1
            meter.errors += marker["errors"]
            result.errors += marker["errors"]
            result.deduplicated += marker["deduplicated"]
            result.computed += marker.get("computed", 0)
            result.new_rows += marker["rows"]
            result.parts_run += 1

    def start_commits() -> None:
        for part in list(waiting):
            sources = needs.get(part, set())
            if all(p in committed or p in written for p in sources):  # a source whose commit failed still has
                waiting.remove(part)  # its rows in its attempt files
                given = {p: written.get(p) for p in sources}  # None: read the committed table
                in_flight[commit.remote(output, plan_ref, part, written[part], result_schema, summarize,
                                        given)] = part
                needs.pop(part, None)

    for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts, names = stats.column("part").to_pylist(), stats.column("file").to_pylist()
        for part, file, rows, sources in zip(parts, names, stats.column("rows").to_numpy(zero_copy_only=False),
                                             stats.column("sources").to_pylist(), strict=True):
            if part in written or part in committed:  # a late copy of rows already delivered (a retried
                continue  # task): never read
            files.setdefault(part, []).append(file)
            if sources:
                needs.setdefault(part, set()).update(sources)
            marks = seen.setdefault(part, np.zeros(plan.part_rows(part), dtype=bool))
            meter.rows += int((~marks[rows]).sum())
            marks[rows] = True
            if marks.all():  # a row delivered twice (a retried task) is counted once; the commit keeps one copy
                written[part] = files.pop(part)
                waiting.append(part)
                del seen[part]
        start_commits()
        if in_flight:
            collect(ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)[0])
        meter.report()
    while in_flight or waiting:
        collect(list(in_flight))
        before = len(waiting)
        start_commits()
        if not in_flight and len(waiting) == before:  # sources never written (their part failed)
            for part in waiting:
                failed[part] = f"copies results of part {min(needs[part] - committed - set(written))}, not written"
            waiting.clear()
    meter.report(force=True)
    failed.update({part: "got only some of its rows" for part in seen})
    if failed:
        examples = "; ".join(f"part {p}: {why}" for p, why in sorted(failed.items())[:3])
        raise RuntimeError(f"{len(failed)} of {len(pending)} parts were not committed ({examples}); the others are. "
                           "A rerun redoes exactly the parts without a commit marker")
    return result
