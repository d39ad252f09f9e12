"""Compatibility: ``cskd_ray.data`` was renamed :mod:`cskd_ray.io` (issue 19); the old names keep working.

``cskd_ray.data.labels.load_labels`` (a documented interface) and the other ``cskd_ray.data.<module>`` names
are the very modules of :mod:`cskd_ray.io`, not copies. New code imports :mod:`cskd_ray.io` (or
``cskd_ray.load_labels``); nothing inside the package imports this one.
"""

from __future__ import annotations

import sys

from cskd_ray.io import datasets, decode, demo, labels, sources, transforms

for _module in (datasets, decode, demo, labels, sources, transforms):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

__all__ = ["datasets", "decode", "demo", "labels", "sources", "transforms"]
