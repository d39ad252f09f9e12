"""The public API (``cskd_ray.__all__``) and the old ``cskd_ray.data`` names resolve to the real objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import cskd_ray


def test_every_public_name_resolves_and_the_old_data_names_are_the_io_modules() -> None:
    for name in cskd_ray.__all__:
        assert getattr(cskd_ray, name) is not None, name
    align, features = (importlib.import_module(f"cskd_ray.stages.{name}") for name in ("align", "features"))
    assert cskd_ray.run_align is align.run and cskd_ray.AlignConfig is align.AlignConfig
    assert cskd_ray.run_features is features.run
    old, new = importlib.import_module("cskd_ray.data.labels"), importlib.import_module("cskd_ray.io.labels")
    assert old is new and old.load_labels is cskd_ray.load_labels
    # importing the package (and naming load) starts nothing heavy
    code = "import sys, cskd_ray; cskd_ray.load; sys.exit(sorted({'torch', 'ray'} & set(sys.modules)) != [])"
    assert subprocess.run([sys.executable, "-c", code], timeout=120, check=False).returncode == 0
