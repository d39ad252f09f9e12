"""Search spaces of a Tune sweep: checked against the stage's config before Ray starts, turned into Tune domains.

A search space maps dotted keys of the stage config (``train.lr``, ``encoder.name``) to one domain each
(``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint``; see :class:`SearchDimension`).
A trial's config is the base config with the sampled values set at those keys (:func:`trial_config`).
"""

from __future__ import annotations

import copy
import difflib
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from cskd_ray.config import ConfigError, StrictModel, _apply, _format_error, _model_at
from cskd_ray.io import storage
from cskd_ray.stages import STAGE_CONFIGS, load_config

if TYPE_CHECKING:
    from cskd_ray.stages.tune import TuneConfig


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchDimension(StrictModel):
    """One key's search domain: exactly one of ``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint``."""

    choice: list[Any] | None = Field(None, min_length=1, description="Each trial samples one of these values.")
    grid: list[Any] | None = Field(
        None, min_length=1, description="Every value is tried (grids of several keys multiply; × num_samples).")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], low > 0: uniform in log space.")
    randint: tuple[int, int] | None = Field(None, description="[low, high]: an integer, both ends included.")

    @model_validator(mode="after")
    def _one_domain(self) -> SearchDimension:
        given = [kind for kind in SEARCH_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SEARCH_KINDS)} (got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and (bounds[0] > bounds[1] if self.randint is not None else bounds[0] >= bounds[1]):
            raise ValueError(f"{given[0]}: [low, high] needs low < high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {self.loguniform[0]})")
        return self

    @property
    def kind(self) -> str:
        """Which domain this is (``choice``, ``grid``, ...)."""
        return next(kind for kind in SEARCH_KINDS if getattr(self, kind) is not None)

    def values(self) -> list[Any]:
        """The listed values (choice, grid) or the two bounds (uniform, loguniform, randint)."""
        return list(getattr(self, self.kind))


class SchedulerConfig(StrictModel):
    """When trials stop: ``asha`` stops the weaker ones at rungs of reports; ``fifo`` runs every trial to its end."""

    kind: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials early; fifo: run all to the end.")
    grace_period: int = Field(1, ge=1, description="Reports (validation checkpoints) every trial gets before a stop.")
    reduction_factor: float = Field(2.0, gt=1, description="At each rung only the best 1/reduction_factor go on.")
    max_t: int = Field(10_000, ge=1, description="ASHA stops any trial after this many reports.")


DEFAULT_METRIC = {"align": "cosine", "teacher": "val_srcc", "distill": "val_srcc"}
NOT_SEARCHABLE = ("input", "output")  # the sweep's own input/output set them


def stage_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config model (sections expanded; lists and mappings are single keys)."""
    keys = []
    for name, field in model.model_fields.items():
        sub = _model_at(model, (name,))
        if sub is None or typing.get_origin(field.annotation) in (list, dict):
            keys.append(prefix + name)
        else:
            keys += stage_keys(sub, f"{prefix}{name}.")
    return keys


def check_key(stage: str, key: str) -> None:
    """``key`` must name a field (or section) of the stage's config.

    Raises:
        ConfigError: Naming the key and listing the valid keys.
    """
    model, parts = STAGE_CONFIGS[stage], key.split(".")
    parent = _model_at(model, tuple(parts[:-1])) if len(parts) > 1 else model
    known = parent is not None and parts[-1] in parent.model_fields and all(
        _model_at(model, tuple(parts[:i])) is not None for i in range(1, len(parts)))
    if not known or parts[0] in NOT_SEARCHABLE:
        valid = [k for k in stage_keys(model) if k.split(".")[0] not in NOT_SEARCHABLE]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"search: unknown key {key!r} for the {stage} stage{hint}; valid keys: {', '.join(valid)}")


def trial_config(stage: str, base: dict, values: dict[str, Any], output: str) -> StrictModel:
    """The stage config of one trial: ``base`` with the dotted ``values`` set and ``output`` replaced.

    Raises:
        ConfigError: A value is not valid for its key.
    """
    data = copy.deepcopy(base)
    for key, value in values.items():
        _apply(data, key.split("."), value)
    data["output"] = output
    try:
        return STAGE_CONFIGS[stage].model_validate(data)
    except ValidationError as exc:
        raise _format_error(stage, "search", exc, STAGE_CONFIGS[stage]) from None


def _check_values(cfg: TuneConfig, base: dict) -> None:
    """Every listed value (and both bounds of a range) must give a valid stage config; encoder names must exist."""
    for key, dim in cfg.search.items():
        for value in dim.values():
            trial_config(cfg.stage, base, {key: value}, base["output"])
        if key == "encoder.name":
            import timm

            from cskd_ray.models.registry import list_encoders, unknown_model

            if base.get("aligned"):
                raise ConfigError("search: encoder.name has no effect while `aligned` is set (the aligned model "
                                  "fixes the architecture); set aligned: null, or search over `aligned` instead")
            for name in dim.values() if dim.kind in ("choice", "grid") else []:
                if not timm.is_model(name):
                    raise ConfigError(f"search.encoder.name: {unknown_model('timm encoder', name, list_encoders())}")


@dataclass
class TunePlan:
    """A validated sweep: the base stage config every trial starts from and the metric to rank by."""

    cfg: TuneConfig
    base: dict
    metric: str

    @property
    def trial_resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) one trial's Train workers need at most (searched worker counts taken at their largest)."""
        def largest(key: str, default: float) -> float:
            dim = self.cfg.search.get(key)
            return max(float(v) for v in dim.values()) if dim is not None else default

        train = self.base["train"]
        workers = largest("train.num_workers", train["num_workers"])
        return workers * largest("train.cpus_per_worker", train["cpus_per_worker"]), workers


def plan_tune(cfg: TuneConfig) -> TunePlan:
    """Load the base stage config and check every search key and value, before Ray starts.

    Raises:
        ConfigError: The base config is invalid, or a search key is unknown, or a value invalid.
    """
    base = load_config(cfg.stage, cfg.config, cfg.set, input_uris=cfg.input,
                       output_uri=storage.join(cfg.output, "best"))
    base_dict = base.model_dump(mode="json")
    for key in cfg.search:
        check_key(cfg.stage, key)
    _check_values(cfg, base_dict)
    return TunePlan(cfg, base_dict, cfg.metric or DEFAULT_METRIC[cfg.stage])


def param_space(search: dict[str, SearchDimension]) -> dict[str, Any]:
    """Tune domains, keyed by the dotted config key."""
    from ray import tune

    def domain(dim: SearchDimension) -> Any:
        low_high = dim.values()
        return {"choice": lambda: tune.choice(low_high), "grid": lambda: tune.grid_search(low_high),
                "uniform": lambda: tune.uniform(*low_high), "loguniform": lambda: tune.loguniform(*low_high),
                "randint": lambda: tune.randint(low_high[0], low_high[1] + 1)}[dim.kind]()

    return {key: domain(dim) for key, dim in search.items()}


