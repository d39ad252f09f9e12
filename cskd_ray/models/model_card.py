"""The model card (``README.md``) of a scoring model pushed to the Hugging Face Hub (:mod:`cskd_ray.models.hub`).

The card is generated from what the model folder records (``model.json``: stage, encoder, head, preprocessing,
training config and validation metrics), the weights' sha256, and the metrics ``cskd-ray evaluate`` wrote for
these exact weights, found next to the model (:func:`find_evaluation`). It opens with YAML front matter the
Hub reads (``license``, ``library_name``, ``tags``, ``metrics``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from cskd_ray.io import storage
from cskd_ray.models.hub import HubError, HubModel

TAGS = ["image-aesthetics-assessment", "image-quality-assessment", "knowledge-distillation", "clip", "cskd", "timm"]
HUB_METRICS = ["spearmanr", "pearsonr", "kendalltau", "accuracy"]
_METRIC_ROWS = (("srcc", "SRCC"), ("krcc", "KRCC"), ("plcc", "PLCC"), ("plcc_logistic", "PLCC (5-parameter logistic)"),
                ("accuracy", "accuracy"), ("emd", "EMD (r = 1)"))
_RESIZE = {"shortest": "the short side is resized to {s} px ({i}), then the centre {s}×{s} is cropped",
           "squash": "the image is resized to {s}×{s} px ({i}); the aspect ratio is not kept",
           "longest": "the long side is resized to {s} px ({i}), then padded with black to {s}×{s}"}


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def find_evaluation(model_dir: str, model_id: str, metrics: str | None = None) -> dict | None:
    """The ``metrics.json`` of ``cskd-ray evaluate`` for the model ``model_id``, or None when there is none.

    Without ``metrics``, the places ``evaluate``, ``cskd-ray pipeline`` and ``cskd-ray demo`` write to are
    tried: ``MODEL/../evaluate``, then ``MODEL/../../evaluate-student``, ``evaluate-teacher`` and ``evaluate``;
    only a file whose ``model_id`` is ``model_id`` (the same weights) counts.

    Raises:
        HubError: If ``metrics`` is given but missing, not JSON, or computed for another model.
    """
    if metrics is not None:
        try:
            report = json.loads(storage.read_text(metrics))
        except (OSError, storage.StorageError, ValueError) as exc:
            raise HubError(f"--metrics {metrics}: cannot read it: {exc}") from None
        if report.get("model_id") != model_id:
            raise HubError(f"--metrics {metrics}: evaluates model {report.get('model_id')!r}, not {model_id!r}")
        return report
    model_dir = model_dir if storage.is_remote(model_dir) else os.path.abspath(model_dir)
    run_dir = _parent(model_dir)
    candidates = [storage.join(run_dir, "evaluate", "metrics.json")]
    candidates += [storage.join(_parent(run_dir), name, "metrics.json")
                   for name in ("evaluate-student", "evaluate-teacher", "evaluate")]
    for uri in candidates:
        if storage.exists(uri):
            report = json.loads(storage.read_text(uri))
            if report.get("model_id") == model_id:
                return {**report, "source": uri}
    return None


def _name(uri: Any) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1] if uri else "?"


def _data_section(description: dict) -> list[str]:
    cfg = description.get("config")
    if not cfg:
        return ["The training data is not recorded in this model's `model.json`."]
    labels = cfg.get("labels") or {}
    lines = [f"- Trained by the `{description['stage']}` stage of cskd_ray ({description.get('step', '?')} steps).",
             f"- Labels: `{_name(cfg.get('input'))}` (format `{labels.get('format', '?')}`); rows of split "
             f"`{labels.get('val_split', '?')}` validated, all other rows trained."]
    if cfg.get("aligned"):
        lines.append(f"- Encoder aligned to CLIP features first (phase 1): `{_name(cfg['aligned'])}`.")
    if cfg.get("pseudo_labels"):
        weights = ", ".join(f"{k} {cfg[k]:g}" for k in ("kd_weight", "feat_weight", "consistency_weight") if k in cfg)
        lines.append(f"- Unlabeled images: the teacher's pseudo-labels `{_name(cfg['pseudo_labels'])}` ({weights}).")
        extra = ", ".join(f"{t['kind']}:{t['name']}" for t in cfg.get("extra_teachers") or [])
        if extra:
            lines.append(f"- Extra frozen teachers: {extra}.")
    return lines


def _metrics_section(description: dict, evaluation: dict | None) -> list[str]:
    lines: list[str] = []
    if evaluation:
        split = f", split `{evaluation['split']}`" if evaluation.get("split") else ""
        lines += [f"`cskd-ray evaluate` on `{_name(evaluation.get('labels'))}`{split}: {evaluation.get('scored')} "
                  f"of {evaluation.get('images')} images scored; accuracy counts a score above "
                  f"{evaluation.get('threshold', '?')} as good.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {evaluation[key]:.4f} |" for key, label in _METRIC_ROWS
                  if isinstance(evaluation.get(key), (int, float))]
    validation = {k.removeprefix("val_"): v for k, v in (description.get("metrics") or {}).items()
                  if k.startswith("val_") and isinstance(v, (int, float))}
    if validation:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(validation.items()))
        step = description.get("step", "?")
        lines += ["", f"Validation during training (the kept checkpoint, step {step}): {shown}."]
    return lines or ["Not evaluated: no `cskd-ray evaluate` metrics for these weights were found and `model.json` "
                     "records no validation metrics."]


def _scale_section(head: dict) -> list[str]:
    if head["kind"] == "distribution":
        return [f"The model predicts a distribution p over {head['bins']} score bins 1..{head['bins']}; the score is "
                f"Σ k·p_k, on the scale 1..{head['bins']}. A score above {head.get('threshold', '?')} counts as good."]
    return [f"The model predicts one score on the labels' scale [{head['low']:g}, {head['high']:g}] (trained on "
            f"labels normalised to [0, 1]). A score above {head.get('threshold', '?')} counts as good."]


def render_model_card(description: dict, hub: HubModel, *, model_id: str, sha256: str, size: int,
                      license: str, evaluation: dict | None) -> str:
    """The card's Markdown: front matter, data, metrics, scale, model files, preprocessing and how to load it."""
    meta = {"license": license, "library_name": "cskd_ray", "tags": TAGS, "metrics": HUB_METRICS}
    pre, encoder = description["preprocess"], description["encoder"]
    size_px = pre["image_size"]
    resize = _RESIZE[pre.get("resize_mode", "shortest")].format(s=size_px, i=pre.get("interpolation", "bicubic"))
    sections = [
        ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {hub.repo_id}", "",
         "An image-aesthetics scoring model trained with cskd_ray, CLIP-based semi-supervised knowledge "
         f"distillation (CSKD, [arXiv 2307.15640](https://arxiv.org/abs/2307.15640)): timm encoder "
         f"`{encoder['name']}` with a {head_kind(description)} head."],
        ["## Data", "", *_data_section(description)],
        ["## Metrics", "", *_metrics_section(description, evaluation)],
        ["## Scale and labels", "", *_scale_section(description["head"])],
        ["## Model", "", f"- Model id: `{model_id}` (the `model` column of `cskd-ray score` tables).",
         f"- Weights: `model.safetensors`, sha256 `{sha256}`, {size} bytes.",
         "- `model.json`: encoder, head and preprocessing, as cskd_ray wrote them (how the model is rebuilt)."],
        ["## Preprocessing", "", f"- Input: {size_px}×{size_px} RGB, EXIF orientation applied; {resize}.",
         f"- Interpolation: {pre.get('interpolation', 'bicubic')}; resize mode: {pre.get('resize_mode', 'shortest')}.",
         f"- Normalisation: x = (pixels / 255 − mean) / std with mean = {list(pre['mean'])}, std = {list(pre['std'])}"
         " (NCHW float32)."],
        ["## How to load it", "", "```python", "import cskd_ray", "", f'model = cskd_ray.load("{hub.uri}")',
         'model.score("photo.jpg")', "```", "", "```bash", f"cskd-ray predict {hub.uri} photo.jpg",
         f"cskd-ray score --model {hub.uri} --input photos/ --output scores/", "```"],
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def head_kind(description: dict) -> str:
    """``10-bin distribution`` or ``scalar``: the head in words."""
    head = description["head"]
    return f"{head['bins']}-bin distribution" if head["kind"] == "distribution" else "scalar"
