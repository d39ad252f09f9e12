"""The results of a Tune sweep: one table row per trial, the best trial's config as YAML, the top-k printout."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cskd_ray import storage
from cskd_ray.config import dump_config
from cskd_ray.tune_space import TunePlan, trial_config

TRIALS_DIR, TABLE, BEST_CONFIG = "trials", "trials", "best_config.yaml"


@dataclass
class TuneResult:
    """What a sweep did: one row per trial (best first), the best trial and where the outputs are."""

    output: str
    rows: list[dict]
    metric: str
    best: dict | None
    best_config: str | None
    resumed: bool
    seconds: float


def _sort_key(metric: str, mode: str) -> Callable[[dict], tuple]:
    def key(row: dict) -> tuple:
        value = row[metric]
        return (math.isnan(value), -value if mode == "max" else value)

    return key


def trial_rows(grid: Any, plan: TunePlan) -> list[dict]:
    """One row per trial, best first: sampled values, best/last metric, reports, epochs, steps, status."""
    rows = []
    for result in grid:
        last = result.metrics or {}
        history = result.metrics_dataframe
        values = history[plan.metric].dropna() if history is not None and plan.metric in history else []
        best = (values.max() if plan.cfg.mode == "max" else values.min()) if len(values) else math.nan
        finished = bool(last.get("done")) and result.error is None
        rows.append({
            "trial_id": last.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
            **{key: result.config.get(key) for key in plan.cfg.search},
            plan.metric: float(best), f"last_{plan.metric}": float(last.get(plan.metric, math.nan)),
            "reports": int(last.get("training_iteration", 0)),
            "epochs": int(last["epoch"]) + 1 if "epoch" in last else 0, "steps": int(last.get("step", 0)),
            "stopped_early": not finished and result.error is None and bool(last),
            "status": "error" if result.error is not None else ("finished" if finished else "stopped"),
            "error": str(result.error).splitlines()[0] if result.error is not None else None,
            "seconds": float(last.get("time_total_s", 0.0)),
            "output": storage.join(plan.cfg.output, TRIALS_DIR, last.get("trial_id", "")),
        })
    return sorted(rows, key=_sort_key(plan.metric, plan.cfg.mode))


def _table(rows: list[dict]) -> pa.Table:
    """Rows → Arrow; a column whose values mix types (or are lists/mappings) is stored as JSON text."""
    columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and kinds <= {int, float}:
            values = [None if v is None else float(v) for v in values]
        elif len(kinds) > 1 or kinds & {list, dict}:
            values = [None if v is None else json.dumps(v) for v in values]
        columns[name] = values
    return pa.table(columns)


def write_outputs(plan: TunePlan, rows: list[dict], best: dict | None) -> str | None:
    """``trials.parquet``, ``trials.csv`` and (when a trial has a metric) ``best_config.yaml``; returns its URI."""
    out = plan.cfg.output
    if rows:
        table, sink = _table(rows), io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes_once(storage.join(out, f"{TABLE}.parquet"), sink.getvalue(), overwrite=True)
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        storage.write_bytes_once(storage.join(out, f"{TABLE}.csv"), sink.getvalue(), overwrite=True)
    if best is None:
        return None
    values = {key: best[key] for key in plan.cfg.search}
    cfg = trial_config(plan.cfg.stage, plan.base, values, storage.join(out, "best"))
    header = (f"# Best trial {best['trial_id']} of the sweep in {out}: {plan.metric} {best[plan.metric]:.4f} "
              f"({plan.cfg.mode}).\n# Sampled: {json.dumps(values)}\n"
              f"# Run it: cskd-ray {plan.cfg.stage} {storage.join(out, BEST_CONFIG)}\n")
    uri = storage.join(out, BEST_CONFIG)
    storage.write_text_once(uri, header + dump_config(cfg), overwrite=True)
    return uri


def format_top(result: TuneResult, k: int) -> str:
    """The top-``k`` trials as a text table plus where the outputs are."""
    if not result.rows:
        return f"tune: no trials ran; see {result.output}"
    keys = [c for c in result.rows[0] if c not in ("trial_id", result.metric, f"last_{result.metric}", "reports",
                                                    "epochs", "steps", "stopped_early", "status", "error", "seconds",
                                                    "output")]
    header = ["rank", "trial", result.metric, *keys, "epochs", "reports", "status"]
    lines = [header]
    for rank, row in enumerate(result.rows[:k], 1):
        shown = [f"{row[key]:.4g}" if isinstance(row[key], float) else str(row[key]) for key in keys]
        lines.append([str(rank), row["trial_id"], f"{row[result.metric]:.4f}", *shown, str(row["epochs"]),
                      str(row["reports"]), row["status"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)
    stopped = sum(r["status"] == "stopped" for r in result.rows)
    errors = sum(r["status"] == "error" for r in result.rows)
    summary = (f"tune: {len(result.rows)} trials ({stopped} stopped early, {errors} errors) in {result.seconds:.0f} s; "
               f"top {min(k, len(result.rows))} by {result.metric}:")
    where = f"tune: table at {storage.join(result.output, TABLE)}.parquet/.csv"
    where += f"; best config at {result.best_config}" if result.best_config else "; no trial reported the metric"
    return "\n".join([summary, table, where])
