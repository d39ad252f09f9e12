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

from cskd_ray.config import dump_config
from cskd_ray.io import storage
from cskd_ray.stages.tune_space import TunePlan, trial_config

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


def _status(trial: Any, result: Any, last: dict, output: str) -> str:
    """``finished``, ``stopped`` (early, by the scheduler), ``error`` or ``unfinished`` (interrupted or not started).

    A trial finished when its stage exported its model (``output/model/model.json``): Tune's ``done`` flag
    is not always in the state a resumed sweep restores.
    """
    if result.error is not None:
        return "error"
    state = getattr(trial, "status", None)  # Tune's trial status, when the grid exposes its trials
    if state not in (None, "TERMINATED"):
        return "unfinished"
    if storage.exists(storage.join(output, "model", "model.json")):
        return "finished"
    return "stopped" if last.get("training_iteration") else "unfinished"


def trial_rows(grid: Any, plan: TunePlan) -> list[dict]:
    """One row per trial, best first: sampled values, best/last metric, reports, epochs, steps, status."""
    trials = list(getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or [])
    rows = []
    for index, result in enumerate(grid):
        trial = trials[index] if len(trials) == len(grid) else None
        last = result.metrics or {}
        config = getattr(trial, "config", None) or result.config or {}
        history = result.metrics_dataframe
        values = history[plan.metric].dropna() if history is not None and plan.metric in history else []
        best = (values.max() if plan.cfg.mode == "max" else values.min()) if len(values) else math.nan
        trial_id = getattr(trial, "trial_id", None) or last.get("trial_id") or result.path.rstrip("/").rsplit("/")[-1]
        output = storage.join(plan.cfg.output, TRIALS_DIR, trial_id)
        status = _status(trial, result, last, output)
        rows.append({
            "trial_id": trial_id, **{key: config.get(key) for key in plan.cfg.search},
            plan.metric: float(best), f"last_{plan.metric}": float(last.get(plan.metric, math.nan)),
            "reports": int(last.get("training_iteration", 0)),
            "epochs": int(last["epoch"]) + 1 if "epoch" in last else 0, "steps": int(last.get("step", 0)),
            "stopped_early": status == "stopped", "status": status,
            "error": str(result.error).splitlines()[0] if result.error is not None else None,
            "seconds": float(last.get("time_total_s", 0.0)),
            "output": output,
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
    count = {status: sum(r["status"] == status for r in result.rows) for status in ("stopped", "error", "unfinished")}
    summary = (f"tune: {len(result.rows)} trials ({count['stopped']} stopped early, {count['error']} errors, "
               f"{count['unfinished']} unfinished) in {result.seconds:.0f} s; top {min(k, len(result.rows))} by "
               f"{result.metric}:")
    where = f"tune: table at {storage.join(result.output, TABLE)}.parquet/.csv"
    where += f"; best config at {result.best_config}" if result.best_config else "; no trial reported the metric"
    lines = [summary, table, where]
    if count["unfinished"]:
        lines.append(f"tune: {count['unfinished']} trial(s) did not finish (interrupted); rerun with --resume to "
                     "finish them")
    return "\n".join(lines)
