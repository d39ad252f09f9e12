"""cskd_ray: CLIP-based semi-supervised knowledge distillation for image aesthetics, on Ray.

Importing the package is cheap and side-effect free: it never starts Ray or reads ``sys.argv``.
Stage drivers take config objects, e.g. ``cskd_ray.run_features(cfg)``; ``cskd_ray.load(model)`` scores
images in plain Python (:mod:`cskd_ray.predict`).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "run_features"]


def run_features(cfg, **kwargs):  # noqa: ANN001, ANN201 - thin lazy re-export, typed at the target
    """Run the features stage; see :func:`cskd_ray.features.run_features`."""
    from cskd_ray.features import run_features as _run

    return _run(cfg, **kwargs)


def load(model, **kwargs):  # noqa: ANN001, ANN201 - thin lazy re-export, typed at the target
    """Load a scoring model for plain-Python use; see :func:`cskd_ray.predict.load`."""
    from cskd_ray.predict import load as _load

    return _load(model, **kwargs)
