"""The stages, one module each: its typed config, its checks and its ``run(config) -> result`` function.

The command line (:mod:`cskd_ray.app.commands`), ``jobs/*.py``, the pipeline, the demo and Tune all call
the same ``run``; the Python API re-exports them (``cskd_ray.run_align``). A stage imports
:mod:`cskd_ray.train`, :mod:`cskd_ray.models` and :mod:`cskd_ray.io` (the floors below) and other stages,
never :mod:`cskd_ray.app`. Importing this package is light: a stage's module (and torch, Ray) is imported
only when its config, checks or run are asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from cskd_ray.config import ConfigError, ConfigRegistry, StrictModel, resolve_config

# The stages with a YAML config, in the order the CLI lists them.
STAGE_CONFIGS = ConfigRegistry({
    "features": "cskd_ray.stages.features:FeaturesConfig",
    "align": "cskd_ray.stages.align:AlignConfig",
    "teacher": "cskd_ray.stages.teacher:TeacherConfig",
    "label": "cskd_ray.stages.label:LabelConfig",
    "score": "cskd_ray.stages.score:ScoreConfig",
    "distill": "cskd_ray.stages.distill:DistillConfig",
    "tune": "cskd_ray.stages.tune:TuneConfig",
})


def load_config(
    stage: str,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    input_uris: list[str] | None = None,
    output_uri: str | None = None,
) -> StrictModel:
    """A stage's config from a YAML file, ``--set`` overrides and ``--input``/``--output`` flags.

    Raises:
        ConfigError: The stage is unknown, the file is missing or not a mapping, a key is unknown, or a
            value is invalid.
    """
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGE_CONFIGS)}")
    return resolve_config(STAGE_CONFIGS[stage], path, overrides, input_uris=input_uris, output_uri=output_uri,
                          name=stage)


def check_stage(stage: str, cfg: Any) -> None:
    """Run ``stage``'s checks (its module's ``check``) on the driver, before Ray starts; nothing is written.

    Raises:
        ConfigError, cskd_ray.io.labels.LabelFormatError, cskd_ray.io.sources.SourceError,
        cskd_ray.models.WeightsUnavailableError: A user-fixable mistake, named in the message.
    """
    importlib.import_module(f"{__name__}.{stage}").check(cfg)
