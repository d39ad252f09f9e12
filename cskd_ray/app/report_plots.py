"""Figures and thumbnails for the run report: matplotlib (Agg) PNGs and small JPEGs, as bytes.

Every function returns encoded image bytes, so the report can embed them as base64 ``data:`` URIs and
stay one self-contained file.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

CURVE_PANELS = (  # (title, metric names): one panel per group present in a stage's history
    ("loss terms", ("loss", "sup", "kd", "feat", "align")),
    ("cosine to CLIP features", ("cosine",)),
    ("validation", ("val_srcc", "val_plcc", "val_accuracy")),
    ("learning rate", ("lr",)),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=96)
    plt.close(fig)
    return buffer.getvalue()


def _series(records: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
    return (np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float))


def curve_panels(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The panels of :data:`CURVE_PANELS` that have data in ``records``, with the metrics present."""
    present = {k for r in records for k, v in r.items() if v is not None}
    return [(title, [n for n in names if n in present]) for title, names in CURVE_PANELS
            if any(n in present for n in names)]


def training_curves(records: list[dict[str, Any]], title: str) -> bytes:
    """One row of panels: loss terms, cosine, validation metrics and lr against the optimizer step."""
    plt = _pyplot()
    panels = curve_panels(records)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for axis, (panel, names) in zip(axes[0], panels, strict=True):
        for name in names:
            steps, values = _series(records, name)
            sparse = len(steps) < 30  # validation runs once per epoch: show its points
            axis.plot(steps, values, marker="o" if sparse else None, markersize=3, linewidth=1.2, label=name)
        axis.set_title(panel, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(names) > 1:
            axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def prediction_scatter(true: np.ndarray, pred: np.ndarray, title: str) -> bytes:
    """Predicted against true score, with the identity line y = x over both ranges."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(4.2, 4.0))
    axis.scatter(true, pred, s=12, alpha=0.7)
    low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    axis.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="y = x")
    axis.set_xlabel("true score")
    axis.set_ylabel("predicted score")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _png(fig)


def score_histograms(series: dict[str, np.ndarray]) -> bytes:
    """One histogram panel per score source (labels, pseudo-labels, bulk scores) on a shared x axis."""
    plt = _pyplot()
    values = np.concatenate(list(series.values()))
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 31)
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 2.8), squeeze=False, sharex=True)
    for axis, (name, data) in zip(axes[0], series.items(), strict=True):
        axis.hist(data, bins=bins, color="#4472c4", alpha=0.85)
        axis.set_title(f"{name} (n = {len(data)})", fontsize=10)
        axis.set_xlabel("score")
        axis.grid(alpha=0.3)
    return _png(fig)


def thumbnail(data: bytes, size: int = 128) -> bytes | None:
    """A JPEG at most ``size`` px on its longer side, or None when the bytes do not decode."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((size, size))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
