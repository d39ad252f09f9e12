"""``cskd-ray evaluate``: score a labeled split with a model and report SRCC, KRCC, PLCC, accuracy and EMD.

The images are scored by the same Ray Data pass as ``label`` (into ``output/scores``, so a rerun scores
only what is missing), then joined with the labels on ``uri``. Metrics (:mod:`cskd_ray.metrics`): SRCC,
KRCC (tau-b) and PLCC (scipy-equal), PLCC after the VQEG 5-parameter logistic fit (``plcc_logistic``;
``plcc_logistic_fitted`` is False when the fit failed and it is the plain PLCC), binary accuracy with
"good" meaning score > threshold (5 for 10-bin AVA labels, else the midpoint of the label range) and EMD
with r = 1 when both sides have distributions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.labels import LABEL_FORMATS, load_labels
from cskd_ray.metrics import evaluate_scores
from cskd_ray.stages import label, load_config

PREDICTIONS_FILE = "predictions.parquet"  # uri, true_score, pred_score, error: one row per labeled image


@dataclass
class EvaluateConfig:
    """What to evaluate: a model folder on a label file (optionally one split of it); ``cskd-ray evaluate``'s flags."""

    model: str
    labels_format: str
    labels_path: str
    output: str
    images_root: str | None = None
    test_list: str | None = None
    split: str | None = None
    threshold: float | None = None


def _labels(request: EvaluateConfig) -> pa.Table:
    table = load_labels(request.labels_format, request.labels_path, request.images_root, test_list=request.test_list)
    if request.split is not None:
        table = table.filter(pc.equal(table.column("split").fill_null(""), request.split))
    if len(table) == 0:
        where = f" in split {request.split!r}" if request.split else ""
        raise ConfigError(f"--labels {request.labels_path}: no rows{where}")
    return table


def run(request: EvaluateConfig) -> dict[str, Any]:
    """Score the labeled images with the model and compute the metrics.

    Writes ``output/metrics.json`` and ``output/predictions.parquet`` (one row per labeled image: ``uri``,
    ``true_score``, ``pred_score``, ``error``), which the run report plots.
    """
    labels = _labels(request)
    manifest = storage.join(request.output, "_inputs.csv")
    sink = io.BytesIO()
    pacsv.write_csv(pa.table({"uri": labels.column("uri")}), sink)
    storage.write_bytes_once(manifest, sink.getvalue(), overwrite=True)
    cfg = load_config("label", None, [f"model={request.model}"], input_uris=[manifest],
                      output_uri=storage.join(request.output, "scores"))
    label_run = label.run(cfg, progress=lambda line: None)
    scores = ResultTable(cfg.output, LABEL_SCHEMA).read(["uri", "score", "distribution", "error"])
    position = {uri: i for i, uri in enumerate(scores.column("uri").to_pylist())}
    order = pa.array([position[uri] for uri in labels.column("uri").to_pylist()], pa.int64())
    matched = scores.take(order)  # Acero joins cannot carry list columns; one row per label, in label order
    joined = labels.append_column("pred_score", matched.column("score")).append_column(
        "pred_distribution", matched.column("distribution")).append_column("error", matched.column("error"))
    ok = joined.filter(joined.column("error").is_null())
    target_dist = ok.column("distribution")
    has_dist = len(ok) > 0 and target_dist.null_count == 0 and ok.column("pred_distribution").null_count == 0
    bins = len(target_dist[0].as_py()) if has_dist else 0
    target = ok.column("score").to_numpy()
    label_scores = labels.column("score").to_numpy()
    midpoint = float(label_scores.min() + label_scores.max()) / 2
    threshold = request.threshold if request.threshold is not None else (5.0 if bins == 10 else midpoint)
    metrics = evaluate_scores(
        ok.column("pred_score").to_numpy(), target, threshold,
        np.asarray(ok.column("pred_distribution").to_pylist()) if has_dist else None,
        np.asarray(target_dist.to_pylist()) if has_dist else None, extended=True,
    )
    report = {"model": request.model, "model_id": label_run.model, "labels": request.labels_path,
              "split": request.split, "threshold": threshold, "images": len(labels), "scored": len(ok),
              "errors": len(joined) - len(ok), **metrics}
    storage.write_text_once(storage.join(request.output, "metrics.json"), json.dumps(report, indent=2), overwrite=True)
    predictions = joined.select(["uri", "score", "pred_score", "error"]).rename_columns(
        ["uri", "true_score", "pred_score", "error"])
    sink = io.BytesIO()
    pq.write_table(predictions, sink)
    storage.write_bytes_once(storage.join(request.output, PREDICTIONS_FILE), sink.getvalue(), overwrite=True)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The metrics as a small aligned text table."""
    rows = [("images", report["images"]), ("scored", report["scored"]), ("errors", report["errors"]),
            ("SRCC", report["srcc"]), ("KRCC", report.get("krcc")), ("PLCC", report["plcc"]),
            ("PLCC (logistic)" if report.get("plcc_logistic_fitted", True) else "PLCC (logistic fit failed)",
             report.get("plcc_logistic")),
            (f"accuracy (> {report['threshold']:g})", report["accuracy"]), ("EMD (r=1)", report["emd"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for name, value in rows:
        shown = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def parse_labels_arg(labels: str) -> tuple[str, str]:
    """``FMT:PATH`` (``--labels``) as ``(format, path)``.

    Raises:
        ConfigError: It is not ``FMT:PATH`` with a known format.
    """
    fmt, sep, path = labels.partition(":")
    if not sep or fmt not in LABEL_FORMATS:
        raise ConfigError(f"--labels {labels!r}: expected FMT:PATH with FMT one of {', '.join(LABEL_FORMATS)}")
    return fmt, path
