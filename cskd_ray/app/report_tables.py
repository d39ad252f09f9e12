"""HTML tables of the run report (:mod:`cskd_ray.app.report`): the metrics tables and the cells every table is made of.

A number cell carries its exact value in ``data-value`` (``repr`` of the float) and shows it rounded to 4
decimals; a metric the run did not record (an evaluation from before KRCC and the logistic PLCC were
computed, a stage without validation) shows "–" and has no ``data-value``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cskd_ray.app.report import RunContents

MISSING = "–"  # en dash: shown for a metric the run did not record
STAGE_METRICS = (("val_srcc", "val SRCC"), ("val_plcc", "val PLCC"), ("val_accuracy", "val accuracy"),
                 ("val_emd", "val EMD"), ("loss", "last loss"), ("cosine", "cosine"))
EVAL_METRICS = (("images", "images"), ("scored", "scored"), ("errors", "errors"), ("srcc", "SRCC"), ("krcc", "KRCC"),
                ("plcc", "PLCC"), ("plcc_logistic", "PLCC (logistic)"), ("accuracy", "accuracy"), ("emd", "EMD"))


@dataclass(frozen=True)
class Flagged:
    """A number shown with a short mark after it and the reason as the cell's tooltip."""

    value: float
    mark: str
    reason: str


def cell(value: Any) -> str:
    """One ``<td>``: numbers right-aligned with ``data-value``, None as "–", anything else as escaped text."""
    if isinstance(value, Flagged):
        return (f'<td class="num" data-value="{value.value!r}" title="{html.escape(value.reason)}">'
                f"{value.value:.4f} {html.escape(value.mark)}</td>")
    if isinstance(value, float):
        return f'<td class="num" data-value="{value!r}">{value:.4f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num" data-value="{value}">{value}</td>'
    if value is None:
        return f'<td class="na">{MISSING}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def html_table(header: list[str], rows: list[tuple[str, list[Any]]], css: str) -> str:
    """A ``<table>`` whose rows carry their key in ``data-row``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f'<tr data-row="{html.escape(key)}">' + "".join(cell(v) for v in values) + "</tr>"
                   for key, values in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _stage_kind(description: dict) -> str:
    config, stage = description.get("config", {}), description.get("stage", "?")
    if stage == "distill":
        return f"distill (kd_weight {config.get('kd_weight')}, feat_weight {config.get('feat_weight')})"
    return stage


def evaluation_values(metrics: dict) -> list[Any]:
    """The :data:`EVAL_METRICS` of one ``metrics.json``; a failed logistic fit (the plain PLCC) is flagged."""
    values = [metrics.get(key) for key, _ in EVAL_METRICS]
    at = [key for key, _ in EVAL_METRICS].index("plcc_logistic")
    if metrics.get("plcc_logistic_fitted") is False and isinstance(values[at], float):
        values[at] = Flagged(values[at], "(no fit)", "the logistic fit failed: this is the plain PLCC")
    return values


def metrics_section(c: RunContents) -> str | None:
    """Best-checkpoint metrics of every training stage, every evaluation's metrics, the demo's run summary."""
    parts = []
    if c.stages:
        rows = [(folder or ".", [folder or ".", _stage_kind(d), d.get("step"),
                                 *[d.get("metrics", {}).get(k) for k, _ in STAGE_METRICS]])
                for folder, d in sorted(c.stages.items())]
        parts.append("<h3>Training stages (the exported checkpoint)</h3>" + html_table(
            ["stage", "kind", "step", *[label for _, label in STAGE_METRICS]], rows, "metrics stages"))
    if c.evaluations:
        rows = [(folder, [folder, m.get("model_id") or m.get("model"), m.get("split"), *evaluation_values(m)])
                for folder, m in sorted(c.evaluations.items())]
        parts.append("<h3>Evaluations</h3>" + html_table(
            ["evaluation", "model", "split", *[label for _, label in EVAL_METRICS]], rows, "metrics evaluations"))
    if c.summary and "total_seconds" in c.summary:
        rates = {k: v["images_per_s"] for k, v in c.summary.items() if isinstance(v, dict) and "images_per_s" in v}
        rows = [("total_seconds", ["total seconds", float(c.summary["total_seconds"])])]
        rows += [(f"{k}_images_per_s", [f"{k} images/s", float(v)]) for k, v in rates.items()]
        parts.append("<h3>Run summary (summary.json)</h3>" + html_table(["", "value"], rows, "metrics summary"))
    return "".join(parts) or None
