"""cskd_ray: CLIP-based semi-supervised knowledge distillation for image aesthetics, on Ray.

The public Python API is what ``__all__`` lists: each stage's ``run`` function and typed config (the same ones
the ``cskd-ray`` command line, ``jobs/*.py``, the pipeline and Ray Tune call), :func:`load_config` to build a
stage's config from YAML and overrides and :func:`check_stage` to run the checks the command line runs before
Ray starts, the whole pipeline (:func:`run_pipeline`), :func:`load` / :class:`Predictor` to score images in
plain Python, and the label readers and metrics. For example::

    import cskd_ray

    cfg = cskd_ray.load_config("align", "jobs/configs/demo/align.yaml", ["train.lr=0.01"])
    result = cskd_ray.run_align(cfg)  # Ray Train; starts a local Ray when none is running
    cskd_ray.load("runs/demo/student/model").score("photo.jpg")

Importing the package is cheap and side-effect free: it never starts Ray, imports torch or reads ``sys.argv``;
each name is imported from its module (``cskd_ray.stages.<stage>``, ...) on first use. The package's floors
(``io`` → ``models`` → ``train`` → ``stages`` → ``app``) are described in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from cskd_ray._version import __version__

# Public name -> "module:attribute" (imported on first use; see __getattr__).
_EXPORTS = {
    "load_config": "cskd_ray.stages:load_config",
    "check_stage": "cskd_ray.stages:check_stage",
    "ConfigError": "cskd_ray.config:ConfigError",
    "run_features": "cskd_ray.stages.features:run",
    "FeaturesConfig": "cskd_ray.stages.features:FeaturesConfig",
    "run_align": "cskd_ray.stages.align:run",
    "AlignConfig": "cskd_ray.stages.align:AlignConfig",
    "run_teacher": "cskd_ray.stages.teacher:run",
    "TeacherConfig": "cskd_ray.stages.teacher:TeacherConfig",
    "run_label": "cskd_ray.stages.label:run",
    "LabelConfig": "cskd_ray.stages.label:LabelConfig",
    "run_distill": "cskd_ray.stages.distill:run",
    "DistillConfig": "cskd_ray.stages.distill:DistillConfig",
    "run_evaluate": "cskd_ray.stages.evaluate:run",
    "EvaluateConfig": "cskd_ray.stages.evaluate:EvaluateConfig",
    "run_diagnose": "cskd_ray.stages.diagnose:run",
    "DiagnoseConfig": "cskd_ray.stages.diagnose:DiagnoseConfig",
    "run_tune": "cskd_ray.stages.tune:run",
    "TuneConfig": "cskd_ray.stages.tune:TuneConfig",
    "run_score": "cskd_ray.stages.score:run",
    "ScoreConfig": "cskd_ray.stages.score:ScoreConfig",
    "run_export": "cskd_ray.stages.export:run",
    "ExportConfig": "cskd_ray.stages.export:ExportConfig",
    "run_pipeline": "cskd_ray.app.pipeline:run_pipeline",
    "PipelineConfig": "cskd_ray.app.pipeline:PipelineConfig",
    "load_pipeline_config": "cskd_ray.app.pipeline:load_pipeline_config",
    "Predictor": "cskd_ray.stages.predict:Predictor",
    "load_labels": "cskd_ray.io.labels:load_labels",
    "metrics": "cskd_ray.metrics:",
}

__all__ = ["__version__", "load", *_EXPORTS]


def load(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201 - thin lazy re-export, typed at the target
    """Load a scoring model for plain-Python use; see :func:`cskd_ray.stages.predict.load` (imported on call)."""
    from cskd_ray.stages.predict import load as _load

    return _load(model, *args, **kwargs)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use, and keep it (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = importlib.import_module(module)
    value = getattr(value, attribute) if attribute else value
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names and the public names not imported yet."""
    return sorted([*globals(), *_EXPORTS])
