"""``cskd-ray report RUN_DIR``: one self-contained HTML page of a run, to look at rather than read.

The run folder is searched for what the stages leave behind, wherever it sits (``cskd-ray demo`` puts
each stage in its own sub-folder, but any layout works):

* a training stage: a folder with ``model/model.json`` (best checkpoint's metrics, resolved config)
  and ``metrics.jsonl`` (the per-step history, :mod:`cskd_ray.train.history`);
* an evaluation: ``metrics.json`` with ``srcc`` (+ ``predictions.parquet``, per image);
* a score table (pseudo-labels, bulk scores): ``_meta.json`` + ``part-*.parquet`` with a ``score`` column;
* ``diagnose.json`` / ``diagnose.png``; Tune results: ``trials.csv`` or ``trials.parquet``;
* ``summary.json`` of ``cskd-ray demo``.

Plots are PNGs (matplotlib, Agg) and thumbnails small JPEGs, embedded as base64: the page needs no
network and no JavaScript. A piece that is missing or unreadable becomes a visible note, never an error.
"""

from __future__ import annotations

import base64
import html
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from cskd_ray.app import report_plots
from cskd_ray.app.report_tables import html_table, metrics_section
from cskd_ray.config import ConfigError
from cskd_ray.io import storage

MAX_TRIAL_ROWS = 200
MAX_CURVES = 12  # training-curve figures; a sweep's trials would otherwise add one each


@dataclass
class RunContents:
    """What :func:`discover` found under a run folder; folder names are relative to ``root``."""

    root: str
    files: set[str]
    summary: dict | None = None
    stages: dict[str, dict] = field(default_factory=dict)  # folder → model.json
    histories: dict[str, list[dict]] = field(default_factory=dict)  # folder → metrics.jsonl records
    evaluations: dict[str, dict] = field(default_factory=dict)  # folder → metrics.json
    tables: dict[str, dict] = field(default_factory=dict)  # folder → _meta.json of a score table
    diagnoses: list[str] = field(default_factory=list)  # folders with diagnose.json/png
    trials: list[str] = field(default_factory=list)  # trials.csv / trials.parquet files
    run_configs: dict[str, dict] = field(default_factory=dict)  # folder → latest _runs/*.json

    def uri(self, *parts: str) -> str:
        """URI of a path relative to the run folder."""
        return storage.join(self.root, *[p for p in parts if p])


def _list(root: str) -> set[str]:
    fs, path = storage.resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return {i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File}


def _json(contents: RunContents, rel: str) -> Any:
    return json.loads(storage.read_text(contents.uri(rel)))


def discover(root: str) -> RunContents:
    """Find the stage outputs under ``root`` (local folder or s3:// prefix)."""
    if not storage.is_dir(root):
        raise ConfigError(f"RUN_DIR {root}: no such folder")
    contents = RunContents(root.rstrip("/"), _list(root))
    for rel in sorted(contents.files):
        folder, name = posixpath.split(rel)
        if "/train/checkpoint_" in f"/{rel}" or name.endswith((".tmp",)) or ".tmp-" in name:
            continue
        if rel == "summary.json":
            contents.summary = _json(contents, rel)
        elif name == "model.json" and posixpath.basename(folder) == "model":
            contents.stages[posixpath.dirname(folder)] = _json(contents, rel)
        elif name == "metrics.jsonl":
            from cskd_ray.train.history import read_history

            contents.histories[folder] = read_history(storage.read_text(contents.uri(rel)))
        elif name == "metrics.json" and "srcc" in (metrics := _json(contents, rel)):
            contents.evaluations[folder] = metrics
        elif name == "_meta.json" and any(f.startswith(f"{folder}/part-") for f in contents.files):
            contents.tables[folder] = _json(contents, rel)
        elif name == "diagnose.json":
            contents.diagnoses.append(folder)
        elif name in ("trials.csv", "trials.parquet"):
            contents.trials.append(rel)
        elif posixpath.basename(folder) == "_runs" and name.endswith(".json"):
            contents.run_configs[posixpath.dirname(folder)] = _json(contents, rel)  # sorted: the latest wins
    inside_eval = {t for t in contents.tables if posixpath.dirname(t) in contents.evaluations}
    for folder in inside_eval | {t for t in contents.tables if "score" not in _columns(contents, t)}:
        contents.tables.pop(folder)
    if not (contents.stages or contents.evaluations or contents.tables or contents.summary or contents.trials
            or contents.diagnoses or contents.histories):
        raise ConfigError(f"RUN_DIR {root}: no stage output found (model/model.json, metrics.json, score tables, "
                          "summary.json, trials.csv); pass the folder a stage or `cskd-ray demo` wrote")
    return contents


def _columns(contents: RunContents, folder: str) -> list[str]:
    first = min(f for f in contents.files if f.startswith(f"{folder}/part-") and f.endswith(".parquet"))
    fs, path = storage.resolve(contents.uri(first))
    return pq.read_schema(fs.open_input_file(path)).names


def read_scores(contents: RunContents, folder: str) -> pa.Table:
    """``uri``, ``score`` rows of a score table that were scored (error rows dropped)."""
    fs, _ = storage.resolve(contents.root)
    shards = [storage.resolve(contents.uri(f))[1] for f in sorted(contents.files)
              if f.startswith(f"{folder}/part-") and f.endswith(".parquet")]
    table = pads.dataset(shards, filesystem=fs, format="parquet").to_table(columns=["uri", "score", "error"])
    return table.filter(pa.compute.and_(table.column("error").is_null(), table.column("score").is_valid()))


def _img(data: bytes, mime: str, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:{mime};base64,{encoded}">'


def curves_section(c: RunContents) -> str | None:
    """Loss terms, cosine, validation metrics and lr of every stage with a history."""
    histories = [(folder, records) for folder, records in sorted(c.histories.items()) if records]
    plots = [_img(report_plots.training_curves(records, folder or "."), "image/png", f"training curves {folder}")
             for folder, records in histories[:MAX_CURVES]]
    left = [folder for folder, _ in histories[MAX_CURVES:]]
    more = f"<p class='note'>not plotted: {html.escape(', '.join(left))}</p>" if left else ""
    return "".join(f"<figure>{p}</figure>" for p in plots) + more or None


def scatter_section(c: RunContents) -> str | None:
    """Predicted against true score for every evaluation that kept its predictions."""
    figures = []
    for folder in sorted(c.evaluations):
        if f"{folder}/predictions.parquet" in c.files:
            fs, path = storage.resolve(c.uri(folder, "predictions.parquet"))
            table = pq.read_table(fs.open_input_file(path))
            table = table.filter(table.column("error").is_null())
            true, pred = table.column("true_score").to_numpy(), table.column("pred_score").to_numpy()
            m = c.evaluations[folder]
            title = f"{folder}: SRCC {m['srcc']:.3f}, PLCC {m['plcc']:.3f} (n = {len(true)})"
            figures.append(_img(report_plots.prediction_scatter(true, pred, title), "image/png", f"scatter {folder}"))
    return "".join(f"<figure>{f}</figure>" for f in figures) or None


def _labels(c: RunContents) -> np.ndarray | None:
    from cskd_ray.io.labels import load_labels

    for description in c.stages.values():
        config = description.get("config", {})
        if isinstance(config.get("labels"), dict) and config.get("input"):
            labels = config["labels"]
            table = load_labels(labels["format"], config["input"], labels.get("images_root"),
                                test_list=labels.get("test_list"))
            return table.column("score").to_numpy()
    return None


def histogram_section(c: RunContents) -> str | None:
    """Histograms of the labels, and of every score table (pseudo-labels, bulk scores)."""
    series: dict[str, np.ndarray] = {}
    if (labels := _labels(c)) is not None:
        series["labels"] = labels
    for folder in sorted(c.tables):
        series[folder] = read_scores(c, folder).column("score").to_numpy()
    series = {k: v for k, v in series.items() if len(v)}
    return _img(report_plots.score_histograms(series), "image/png", "score histograms") if series else None


def _gallery(c: RunContents, rows: list[dict], title: str) -> str:
    cards = []
    for row in rows:
        try:
            thumb = report_plots.thumbnail(storage.read_bytes(row["uri"]))
        except storage.StorageError:
            thumb = None
        name = html.escape(row["uri"].rsplit("/", 1)[-1])
        picture = _img(thumb, "image/jpeg", name, "thumb") if thumb else '<div class="missing">unreadable</div>'
        cards.append(f'<figure class="card">{picture}<figcaption><b data-score="{row["score"]!r}">'
                     f'{row["score"]:.2f}</b> {name}</figcaption></figure>')
    return f'<h4>{html.escape(title)}</h4><div class="gallery">{"".join(cards)}</div>'


def gallery_section(c: RunContents, top: int) -> str | None:
    """The ``top`` highest and lowest scored images of every score table, with their scores."""
    parts = []
    for folder in sorted(c.tables):
        rows = read_scores(c, folder).sort_by([("score", "descending"), ("uri", "ascending")]).to_pylist()
        if rows:
            parts.append(f"<h3>{html.escape(folder)} ({len(rows)} scored images)</h3>")
            parts.append(_gallery(c, rows[:top], f"top {min(top, len(rows))}"))
            parts.append(_gallery(c, rows[::-1][:top], f"bottom {min(top, len(rows))}"))
    return "".join(parts) or None


def diagnose_section(c: RunContents) -> str | None:
    """The attention distance and entropy plots written by ``diagnose``."""
    figures = [f"<figure>{_img(storage.read_bytes(c.uri(folder, 'diagnose.png')), 'image/png', f'diagnose {folder}')}"
               f"<figcaption>{html.escape(folder)}</figcaption></figure>"
               for folder in sorted(c.diagnoses) if f"{folder}/diagnose.png" in c.files]
    return "".join(figures) or None


def trials_section(c: RunContents) -> str | None:
    """Ray Tune trials tables (``trials.csv`` / ``trials.parquet``), whatever their columns."""
    parts = []
    for rel in sorted(c.trials):
        folder = posixpath.dirname(rel)
        if rel.endswith(".csv") and posixpath.join(folder, "trials.parquet") in c.trials:
            continue  # the same table, typed
        fs, path = storage.resolve(c.uri(rel))
        with fs.open_input_file(path) as source:
            table = pq.read_table(source) if rel.endswith(".parquet") else pacsv.read_csv(source)
        shown = table.slice(0, MAX_TRIAL_ROWS).to_pylist()
        rows = [(str(i), list(row.values())) for i, row in enumerate(shown)]
        more = f"<p class='note'>first {MAX_TRIAL_ROWS} of {len(table)} trials</p>" if len(table) > len(shown) else ""
        parts.append(f"<h3>{html.escape(rel)}</h3>" + html_table(table.column_names, rows, "trials") + more)
        if (best := posixpath.join(folder, "best_config.yaml")) in c.files:
            parts.append(f"<details><summary>{html.escape(best)}</summary><pre>"
                         f"{html.escape(storage.read_text(c.uri(best)))}</pre></details>")
    return "".join(parts) or None


def configs_section(c: RunContents) -> str | None:
    """The resolved config of every stage (from ``model.json`` and the tables' ``_runs`` records)."""
    configs = {f"{k or '.'} (model.json)": v.get("config") for k, v in c.stages.items()}
    configs.update({f"{k} (_runs)": v.get("config") for k, v in c.run_configs.items()})
    blocks = [f"<details><summary>{html.escape(name)}</summary><pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}"
              "</pre></details>" for name, cfg in sorted(configs.items()) if cfg]
    return "".join(blocks) or None


Section = Callable[[RunContents], "str | None"]
SECTIONS: tuple[tuple[str, str, str], ...] = (  # (id, title, note shown when the section has nothing)
    ("metrics", "Metrics", "no model/model.json, metrics.json or summary.json found"),
    ("curves", "Training curves", "no metrics.jsonl found (training stages write it next to model/)"),
    ("scatter", "Predicted vs true", "no evaluation with predictions.parquet found (run `cskd-ray evaluate`)"),
    ("histograms", "Score histograms", "no labels or score tables found"),
    ("galleries", "Top and bottom scored images", "no score table (pseudo-labels, bulk scores) found"),
    ("diagnose", "Attention diagnostics", "no diagnose.png found (run `cskd-ray diagnose`)"),
    ("trials", "Tune trials", "no trials.csv / trials.parquet found (no sweep in this run)"),
    ("configs", "Resolved configs", "no resolved config found"),
)
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}td.na{text-align:center;color:#999}
.note{color:#8a6d3b;background:#fcf8e3;padding:.4em .7em;border-radius:4px}
.gallery{display:flex;flex-wrap:wrap;gap:.5em}.card{margin:0;text-align:center;font-size:.75em;width:136px}
.card img{border-radius:3px}.missing{width:128px;height:96px;background:#eee;line-height:96px}
figure{margin:.5em 0}img{max-width:100%}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
"""


@dataclass
class ReportResult:
    """Where the report went and which sections have content (the rest show a note)."""

    output: str
    sections: dict[str, bool]
    notes: dict[str, str]


def build_html(contents: RunContents, top: int = 8) -> tuple[str, dict[str, bool], dict[str, str]]:
    """The report page; every section that is missing or fails to build becomes a note instead."""
    builders: dict[str, Section] = {
        "metrics": metrics_section, "curves": curves_section, "scatter": scatter_section,
        "histograms": histogram_section, "galleries": lambda c: gallery_section(c, top),
        "diagnose": diagnose_section, "trials": trials_section, "configs": configs_section,
    }
    body, present, notes = [], {}, {}
    for key, title, missing in SECTIONS:
        try:
            content = builders[key](contents)
        except Exception as exc:  # a damaged or unexpected piece must not cost the whole report
            content, missing = None, f"could not be built: {type(exc).__name__}: {exc}"
        present[key] = content is not None
        if content is None:
            notes[key] = missing
        shown = content if content is not None else f'<p class="note">Skipped: {html.escape(missing)}.</p>'
        body.append(f'<section id="{key}"><h2>{title}</h2>{shown}</section>')
    title = f"cskd_ray run report: {html.escape(contents.root)}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body><h1>{title}</h1>{''.join(body)}</body></html>")
    return page, present, notes


def write_report(run_dir: str, output: str | None = None, top: int = 8) -> ReportResult:
    """Discover the run's outputs under ``run_dir`` and write the HTML report (default ``run_dir/report.html``)."""
    if top < 1:
        raise ConfigError(f"--top {top}: must be at least 1")
    run_dir = run_dir if storage.is_remote(run_dir) else storage.resolve(run_dir)[1]
    contents = discover(run_dir)
    page, present, notes = build_html(contents, top)
    target = output or storage.join(run_dir, "report.html")
    storage.write_text_once(target, page, overwrite=True)
    return ReportResult(target, present, notes)
