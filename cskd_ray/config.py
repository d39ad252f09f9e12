"""The config machinery every stage shares: defaults, then a YAML file, then ``--set key=value`` overrides.

Each stage owns its typed config (a :class:`StrictModel` in its own module under :mod:`cskd_ray.stages`,
with shared sections in :mod:`cskd_ray.io` and :mod:`cskd_ray.train.config`); this module only builds one
from YAML and overrides. Unknown keys are errors that list the valid keys; a value of the wrong type or
outside its choices names the key and what is allowed. The resolved config is saved next to every output
(``resolved_config.yaml``). ``cskd_ray.stages.load_config(stage, ...)`` finds a stage's config by name.
"""

from __future__ import annotations

import difflib
import importlib
import os
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


def single_input(value: Any) -> Any:
    """``--input`` gives a list; stages that read one file or table take its only element."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"this stage takes exactly one input URI, got {len(value)}")
        return value[0]
    return value


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it and the valid choices."""


class StrictModel(BaseModel):
    """Base for configs: unknown keys are rejected and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigRegistry(Mapping):
    """Config classes by name, each imported on first use from ``"module:Class"``, so listing the names is light.

    The floor that owns the configs fills it (``cskd_ray.stages.STAGE_CONFIGS``); a name it does not hold
    raises ``KeyError``.
    """

    def __init__(self, entries: dict[str, str]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type[StrictModel]:
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> dict[str, str]:
        """Name → ``"module:Class"``, without importing anything (to build a larger registry from this one)."""
        return dict(self._entries)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config model found at a validation-error location (list indices are skipped)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in candidates for a in typing.get_args(c)]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current


def _format_error(stage: str, source: str, exc: ValidationError, model: type[BaseModel]) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, err["loc"][:-1])
        valid = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{source}: unknown key {key!r} in {stage} config{hint}; valid keys: {', '.join(valid)}")
    if err["type"] == "missing":
        return ConfigError(f"{source}: missing required key {key!r} in {stage} config")
    if not err["loc"]:  # a check across keys (model validator): its message names the keys
        return ConfigError(f"{source}: {err['msg'].removeprefix('Value error, ')}")
    return ConfigError(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` into (``["a", "b"]``, YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set batch_size=32")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def _apply(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for part in keys[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {part!r} is not a section")
    node[keys[-1]] = value


def resolve_config(
    model: type[StrictModel],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    input_uris: list[str] | None = None,
    output_uri: str | None = None,
    name: str | None = None,
) -> StrictModel:
    """Build a ``model`` config from a YAML file, ``--set`` overrides and ``--input``/``--output`` flags.

    Args:
        model: The config class (a stage's, e.g. ``cskd_ray.stages.align.AlignConfig``).
        path: YAML file of keys; None: only defaults and overrides.
        overrides: ``key=value`` items (dotted keys, YAML values), applied after the file.
        input_uris: Replaces ``input`` (the ``--input`` flag).
        output_uri: Replaces ``output`` (the ``--output`` flag).
        name: The stage's name in error messages (default: the class name).

    Raises:
        ConfigError: The file is missing or not a mapping, a key is unknown, or a value is invalid.
    """
    stage = name or model.__name__
    data: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        data = loaded
    for item in overrides or []:
        _apply(data, *parse_override(item))
    if input_uris:
        data["input"] = list(input_uris)
    if output_uri:
        data["output"] = output_uri
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        raise _format_error(stage, source, exc, model) from None
    _absolutize(cfg)
    return cfg


URI_FIELDS = ("input", "output", "uri", "aligned", "images_root", "test_list", "model", "pseudo_labels", "features",
              "label_file", "score_input", "config", "teacher_model")


def _absolutize(node: Any) -> None:
    """Make local paths in URI fields absolute: Ray workers do not share the driver's working directory."""
    if isinstance(node, list):
        for item in node:
            _absolutize(item)
        return
    if not isinstance(node, BaseModel):
        return
    for name in type(node).model_fields:
        value = getattr(node, name)
        if name in URI_FIELDS and isinstance(value, str):
            object.__setattr__(node, name, _absolute(value))
        elif name in URI_FIELDS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            object.__setattr__(node, name, [_absolute(v) for v in value])
        else:
            _absolutize(list(value.values()) if isinstance(value, dict) else value)


def _absolute(uri: str) -> str:
    """A local path made absolute; URIs (``s3://...``) and Hub models (``hf-hub:org/name``) are kept as given."""
    if not uri or "://" in uri or uri.startswith("hf-hub:"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what is saved next to outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
