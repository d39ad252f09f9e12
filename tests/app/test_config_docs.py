"""``cskd-ray config show STAGE``: every key of every stage config is listed with its true default and a description."""

from __future__ import annotations

import re
import typing

import pytest
import yaml
from pydantic import BaseModel

from cskd_ray import config
from cskd_ray.app.cli import main
from cskd_ray.app.config_docs import CONFIGS as STAGE_CONFIGS  # the stages' configs and the pipeline's


def _models_in(annotation: typing.Any) -> list[type[BaseModel]]:
    args, stack = [], [annotation]
    while stack:
        annotation = stack.pop()
        args.append(annotation)
        stack += typing.get_args(annotation)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _config_models() -> set[type[BaseModel]]:
    """Every model a stage config holds (nested sections, list items, mapping values), and every StrictModel."""
    todo = list(STAGE_CONFIGS.values())  # imports every stage's module, so all StrictModel subclasses exist
    found: set[type[BaseModel]] = set()
    subclasses = [config.StrictModel]
    while subclasses:
        model = subclasses.pop()
        subclasses += model.__subclasses__()
        found.add(model)
    while todo:
        model = todo.pop()
        found.add(model)
        todo += [m for field in model.model_fields.values() for m in _models_in(field.annotation) if m not in found]
    return found


def test_every_config_field_has_a_description() -> None:
    models = _config_models()
    assert {"TrainerConfig", "SourceConfig", "SearchDimension", "DemoDataConfig"} <= {m.__name__ for m in models}
    missing = sorted(f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items()
                     if not (field.description or "").strip())
    assert not missing, f"config fields without Field(description=...): {missing}"


def _default(model: type[BaseModel], key: str) -> typing.Any:
    """The default of a dotted key, read from the model itself (not from the listing)."""
    value: typing.Any = model.model_construct()
    section = model
    for part in key.split("."):
        if value is None:  # inside an optional section (demo_data: null): its keys' own defaults
            value = section.model_construct()
        section = next(iter(_models_in(type(value).model_fields[part].annotation)), section)
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_config_show_lists_every_key_with_its_default(stage: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", stage]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"# {stage} ({STAGE_CONFIGS[stage].__name__}): ")
    keys = {}
    for line in lines[2:]:
        if line.startswith("# "):
            assert re.fullmatch(r"# [\w.]+: \S.*", line), line  # a section and its description
            continue
        match = re.fullmatch(r"(\S+) = (.+?) +# (\S.*)", line)
        assert match, f"not 'key = default  # description': {line!r}"
        keys[match.group(1)] = match.group(2)
    top = {name for name, field in STAGE_CONFIGS[stage].model_fields.items()
           if field.is_required() or not isinstance(field.get_default(call_default_factory=True), BaseModel)}
    assert top <= set(keys)  # every top-level key that is not a section is listed
    for key, shown in keys.items():
        if "[]" in key or "<name>" in key or shown == "<required>":
            continue
        assert yaml.safe_load(shown) == _default(STAGE_CONFIGS[stage], key), key  # what --set key=<shown> gives


def test_config_show_nested_keys_are_dotted(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", "distill"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\.lr = 0\.001 +# Peak learning rate of AdamW\.$", out, re.M)
    assert re.search(r"^extra_teachers\[\]\.kind = <required> +# .*\(one of: clip, timm\)$", out, re.M)
    assert re.search(r"^# augment: ", out, re.M) and re.search(r"^augment\.noise = 0\.03 ", out, re.M)
    assert main(["config", "show", "tune"]) == 0
    assert re.search(r"^search\.<name>\.loguniform = null +# ", capsys.readouterr().out, re.M)


def test_config_show_unknown_stage_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", "evaluat"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: config show 'evaluat': unknown stage; valid stages: {', '.join(STAGE_CONFIGS)}\n"
