"""``cskd-ray config show STAGE``: every key of a stage's config, its default and its description.

The descriptions are the ``Field(description=...)`` of the typed configs (each stage's, in its module under
:mod:`cskd_ray.stages`, and the pipeline's), so the
listing cannot drift from what the configs accept. Nested sections are shown with dotted keys, as
``--set`` takes them (``train.lr = 0.001  # Peak learning rate of AdamW.``); list items as ``key[].sub``
and mapping values as ``key.<name>.sub``. Required keys show ``<required>``.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cskd_ray.config import ConfigError, ConfigRegistry
from cskd_ray.stages import STAGE_CONFIGS

# Every config `cskd-ray config show` knows, in the order it lists them: the stages' and the pipeline's.
_STAGES = STAGE_CONFIGS.entries()
CONFIGS = ConfigRegistry({**{name: entry for name, entry in _STAGES.items() if name != "tune"},
                          "pipeline": "cskd_ray.app.pipeline:PipelineConfig", "tune": _STAGES["tune"]})

REQUIRED = "<required>"
MAX_ALIGN = 44  # keys longer than this are not padded to line up their comments


@dataclass(frozen=True)
class ConfigKey:
    """One line of the listing: a dotted key (or a section), its default as YAML text, its description."""

    key: str
    value: str | None  # None: a section, whose keys follow
    description: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds (``Model``, ``Model | None``, ``list[Model]``, ``dict[str, Model]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _literals(annotation: Any) -> list[Any]:
    """The values of the ``Literal`` types in an annotation (its choices), in order."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [value for arg in typing.get_args(annotation) for value in _literals(arg)]


def show_value(value: Any) -> str:
    """A default as it would be written in YAML or after ``--set key=``: null, true, 0.001, [.jpg], ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value, ensure_ascii=False)


def _description(field: FieldInfo) -> str:
    text = " ".join((field.description or "").split())
    origin = typing.get_origin(field.annotation)
    if origin is dict:
        keys = _literals(typing.get_args(field.annotation)[0])
        return f"{text} (keys: {', '.join(map(str, keys))})" if keys else text
    choices = [] if _models_in(field.annotation) else _literals(field.annotation)
    return f"{text} (one of: {', '.join(map(str, choices))})" if choices else text


def iter_config_keys(model: type[BaseModel], prefix: str = "") -> Iterator[ConfigKey]:
    """Every key of ``model`` in declaration order, sections followed by their own keys (depth first)."""
    for name, field in model.model_fields.items():
        key, description = f"{prefix}{name}", _description(field)
        nested = _models_in(field.annotation)
        origin = typing.get_origin(field.annotation)
        if nested and origin in (list, dict):
            value = REQUIRED if field.is_required() else show_value(field.get_default(call_default_factory=True))
            yield ConfigKey(key, value, description)
            yield from iter_config_keys(nested[0], f"{key}[]." if origin is list else f"{key}.<name>.")
        elif nested:
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            yield ConfigKey(key, "null" if default is None and not field.is_required() else None, description)
            yield from iter_config_keys(nested[0], f"{key}.")
        else:
            value = REQUIRED if field.is_required() else show_value(field.get_default(call_default_factory=True))
            yield ConfigKey(key, value, description)


def stage_config_model(stage: str) -> type[BaseModel]:
    """The config model of ``stage``.

    Raises:
        ConfigError: If ``stage`` has no config; the message lists the stages that have one.
    """
    if stage not in CONFIGS:
        raise ConfigError(f"config show {stage!r}: unknown stage; valid stages: {', '.join(CONFIGS)}")
    return CONFIGS[stage]


def render_stage_config(stage: str) -> str:
    """The text ``cskd-ray config show STAGE`` prints: a header, then one ``key = default  # description`` a line."""
    model = stage_config_model(stage)
    summary = " ".join((model.__doc__ or "").strip().split("\n\n")[0].replace("``", "").split())
    keys = list(iter_config_keys(model))
    width = min(MAX_ALIGN, max(len(f"{k.key} = {k.value}") for k in keys if k.value is not None))
    lines = [f"# {stage} ({model.__name__}): {summary}",
             f"# Set keys in the YAML file or with --set KEY=VALUE; {REQUIRED} keys have no default."]
    for item in keys:
        if item.value is None:
            lines.append(f"# {item.key}: {item.description}")
        else:
            lines.append(f"{f'{item.key} = {item.value}':<{width}}  # {item.description}")
    return "\n".join(lines)
