"""Bulk scoring (``cskd-ray score``): any collection through a trained or exported model, with a summary.

The pass is the label stage's (:func:`cskd_ray.stages.label.score_missing`): streaming Ray Data with read and
decode tasks on CPUs overlapping batched model actors (GPU when present), memory bounded by small blocks
and an object-store limit, one row per input URI (``uri, sha256, score, distribution, model, error``)
in write-once Parquet shards, and a rerun that scores only what is missing.

Around it this module adds, at the end of every run:

- a **summary** of the output table, printed and saved as ``OUTPUT/_runs/<time>-<id>.json``: images in,
  scored, errors by kind (the error message up to its first ``:``), images/s of this run, and a
  histogram of scores over the head's scale ``[lo, hi]`` (1..K for distribution heads, the label range for
  scalar heads; scores outside are counted in the end bins), 10 equal bins;
- with ``min_score = t``, a **manifest** ``OUTPUT/_manifests/min_score-<t>.csv`` (``uri,score``, sorted by
  URI, one line per URI with score ≥ t), rewritten from the whole table on every run, so it always
  matches the output and can be fed back as an input manifest.
"""

from __future__ import annotations

import functools
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field

from cskd_ray.config import dump_config
from cskd_ray.io import storage
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.preflight import check_paths, check_sources
from cskd_ray.stages.label import LabelConfig, check_parts_config, result_dict, score_missing


class ScoreConfig(LabelConfig):
    """Bulk scoring of any collection with a trained or exported model (``cskd-ray score``)."""

    model: str = Field(description="Model folder written by teacher or distill (output/model), or by export.")
    min_score: float | None = Field(
        None, description="Also write OUTPUT/_manifests/min_score-<t>.csv: the URIs (and scores) at or above this "
        "score."
    )
    shard_rows: int = Field(1024, ge=1, description="Rows per output Parquet shard (a kill loses at most these).")


HISTOGRAM_BINS = 10


def score_scale(head: dict) -> tuple[float, float]:
    """The range ``[lo, hi]`` of a head's scores: ``[1, K]`` for K-bin distributions, the label range for scalars."""
    if head["kind"] == "distribution":
        return 1.0, float(head["bins"])
    return float(head["low"]), float(head["high"])


def error_kind(message: str) -> str:
    """The kind of an error row: its message up to the first ``:`` (``read error``, ``not an image``, ...)."""
    return message.split(":", 1)[0].strip()


def summarize_table(table: pa.Table, head: dict) -> dict:
    """Counts, errors by kind and the score histogram of a score table (columns ``score`` and ``error``)."""
    scores = table.filter(pc.is_valid(table.column("score"))).column("score").to_numpy()
    kinds = Counter(error_kind(e) for e in table.filter(pc.is_valid(table.column("error"))).column("error").to_pylist())
    lo, hi = score_scale(head)
    counts, edges = np.histogram(np.clip(scores, lo, hi), bins=HISTOGRAM_BINS, range=(lo, hi))
    stats = {}
    if len(scores):
        stats = {"mean": float(scores.mean()), "min": float(scores.min()), "max": float(scores.max())}
    return {"rows": len(table), "scored": len(scores), "errors": sum(kinds.values()),
            "errors_by_kind": dict(sorted(kinds.items())), "score": stats,
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}}


def merge_summaries(summaries: list[dict], head: dict) -> dict:
    """One summary of several tables' :func:`summarize_table` results (the parts of an output)."""
    lo, hi = score_scale(head)
    edges = np.histogram_bin_edges([], bins=HISTOGRAM_BINS, range=(lo, hi))
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    kinds: Counter[str] = Counter()
    rows = scored = 0
    total, low, high = 0.0, float("inf"), float("-inf")
    for summary in summaries:
        rows += summary["rows"]
        scored += summary["scored"]
        kinds.update(summary["errors_by_kind"])
        counts += np.asarray(summary["histogram"]["counts"], dtype=np.int64)
        if summary["score"]:
            total += summary["score"]["mean"] * summary["scored"]
            low, high = min(low, summary["score"]["min"]), max(high, summary["score"]["max"])
    stats = {"mean": total / scored, "min": low, "max": high} if scored else {}
    return {"rows": rows, "scored": scored, "errors": sum(kinds.values()),
            "errors_by_kind": dict(sorted(kinds.items())), "score": stats,
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}}


def summarize_parts(output: str, head: dict) -> dict:
    """The summary of a parts-layout output, merged from its commit markers.

    A part file is read only when its marker has no summary (e.g. one written by ``label``).
    """
    from cskd_ray.io.part_pass import committed_parts, part_file, read_markers

    summaries = []
    for marker in read_markers(output, sorted(committed_parts(output))):
        if "summary" not in marker:
            table = pq.read_table(pa.BufferReader(storage.read_bytes(part_file(output, marker["part"]))),
                                  columns=["score", "error"])
            marker["summary"] = summarize_table(table, head)
        summaries.append(marker["summary"])
    return merge_summaries(summaries, head)


def write_parts_min_score_manifest(output: str, threshold: float) -> tuple[str, int]:
    """:func:`write_min_score_manifest` for a parts-layout output, streamed part by part.

    Lines are ``uri, score[, id]`` in plan order (not sorted); the driver holds one part's at a time, never the
    whole table.
    """
    import tempfile

    from cskd_ray.io.part_pass import committed_parts, part_file

    uri, kept = manifest_uri(output, threshold), 0
    with tempfile.NamedTemporaryFile(suffix=".csv") as local:
        writer = None
        for part in sorted(committed_parts(output)):
            fs, path = storage.resolve(part_file(output, part))
            with fs.open_input_file(path) as handle:
                names = pq.ParquetFile(handle).schema_arrow.names
                table = pq.read_table(handle, columns=["uri", "score", *(["id"] if "id" in names else [])])
            table = table.filter(pc.fill_null(pc.greater_equal(table.column("score"), threshold), False))
            if writer is None:
                writer = pacsv.CSVWriter(local.name, table.schema)
            writer.write_table(table)
            kept += len(table)
        if writer is None:
            local.write(b'"uri","score"\n')
            local.flush()
        else:
            writer.close()
        storage.upload_file(local.name, uri)
    return uri, kept


def text_histogram(histogram: dict, width: int = 40) -> str:
    """The histogram as text lines: ``lo–hi | ####  count``."""
    counts, edges = histogram["counts"], histogram["edges"]
    top = max(counts) or 1
    return "\n".join(f"  {edges[i]:6.2f}–{edges[i + 1]:<6.2f} | {'#' * round(width * c / top):<{width}} {c}"
                     for i, c in enumerate(counts))


def manifest_uri(output: str, threshold: float) -> str:
    """Where the manifest of images with score ≥ ``threshold`` goes."""
    return storage.join(output, "_manifests", f"min_score-{threshold:g}.csv")


def write_min_score_manifest(table: pa.Table, output: str, threshold: float) -> tuple[str, int]:
    """Rewrite the manifest of ``uri, score`` with score ≥ ``threshold`` (sorted, one line per URI)."""
    kept = table.filter(pc.fill_null(pc.greater_equal(table.column("score"), threshold), False))
    kept = kept.select(["uri", "score"]).group_by("uri").aggregate([("score", "max")]).rename_columns(["uri", "score"])
    kept = kept.sort_by("uri")
    sink = io.BytesIO()
    pacsv.write_csv(kept, sink)
    uri = manifest_uri(output, threshold)
    storage.write_bytes_once(uri, sink.getvalue(), overwrite=True)
    return uri, len(kept)


def run(cfg: ScoreConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Score what is missing in ``cfg.output``, then summarise the table and write the manifest.

    Ray must be initialised. Returns the summary (also saved under ``OUTPUT/_runs/``).
    """
    from cskd_ray.models.saved import describe_scoring_model

    head = describe_scoring_model(cfg.model)["head"]
    result = score_missing(cfg, "score", progress, functools.partial(summarize_table, head=head))
    summary = {"output": cfg.output, "model": result.model, "images_in": result.inputs,
               "run": result_dict(result), "min_score": cfg.min_score}
    if (ResultTable(cfg.output, LABEL_SCHEMA).read_meta() or {}).get("layout") == "parts":
        summary["table"] = summarize_parts(cfg.output, head)  # nothing per row on the driver
        if cfg.min_score is not None:
            summary["manifest"], summary["manifest_rows"] = write_parts_min_score_manifest(cfg.output, cfg.min_score)
    else:
        table = ResultTable(cfg.output, LABEL_SCHEMA).read(["uri", "score", "error"])
        summary["table"] = summarize_table(table, head)
        if cfg.min_score is not None:
            summary["manifest"], summary["manifest_rows"] = write_min_score_manifest(table, cfg.output,
                                                                                     cfg.min_score)
    record = {**summary, "config": cfg.model_dump(mode="json"), "config_yaml": dump_config(cfg)}
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
    summary["summary_json"] = storage.join(cfg.output, "_runs", name)
    storage.write_text_once(summary["summary_json"], json.dumps(record, indent=2))
    return summary


def check(cfg: ScoreConfig) -> None:
    """Before Ray starts: paths and sources, then the model and the output's model.

    A Hub model ``hf-hub:org/name[@revision]`` is pinned here (``cfg.model`` is rewritten) to the commit the
    driver fetched, so every actor loads the same weights; an export's file must match its checksum; an
    existing output must hold this model's scores.
    """
    from cskd_ray.models.hub import is_hub_uri, pin_revision
    from cskd_ray.models.saved import describe_scoring_model, scoring_model_id, verified_export_file

    check_paths(cfg)
    check_sources(cfg)
    check_parts_config(cfg)
    if is_hub_uri(cfg.model):
        cfg.model = pin_revision(cfg.model)
    description = describe_scoring_model(cfg.model)
    if "format" in description:
        verified_export_file(cfg.model, description)
    model_id = scoring_model_id(cfg.model, description)
    ResultTable(cfg.output, LABEL_SCHEMA).check_meta({"model": model_id, "weights": model_id, "model_key": model_id})


def format_summary(summary: dict) -> str:
    """The summary as the lines ``cskd-ray score`` prints."""
    run, table = summary["run"], summary["table"]
    kinds = ", ".join(f"{k} {v}" for k, v in table["errors_by_kind"].items()) or "none"
    lines = [f"score: {summary['images_in']} images in, {run['already_done']} already scored, {run['new_rows']} new "
             f"rows ({run['reused']} copied by content) in {run['seconds']:.1f} s, {run['images_per_s']:.1f} img/s",
             f"score: output holds {table['rows']} rows: {table['scored']} scored, {table['errors']} errors ({kinds})"]
    if table["score"]:
        stats = table["score"]
        lines.append(f"score: mean {stats['mean']:.3f}, min {stats['min']:.3f}, max {stats['max']:.3f}; histogram:")
        lines.append(text_histogram(table["histogram"]))
    if summary.get("manifest"):
        lines.append(f"score: {summary['manifest_rows']} images with score >= {summary['min_score']:g} listed in "
                     f"{summary['manifest']}")
    lines.append(f"score: table at {summary['output']} (model {summary['model']}); summary at "
                 f"{summary['summary_json']}")
    return "\n".join(lines)


