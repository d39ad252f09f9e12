"""Tests for :mod:`cskd_ray.config` (and ``cskd_ray.stages.load_config``): the shipped YAML files, overrides and error
messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from cskd_ray.app.config_docs import CONFIGS
from cskd_ray.config import ConfigError, dump_config, parse_override, resolve_config
from cskd_ray.io.decode import DEFAULT_MAX_PIXELS
from cskd_ray.io.sources import SourceConfig
from cskd_ray.stages import STAGE_CONFIGS, load_config
from cskd_ray.stages.features import ClipConfig, FeaturesConfig

CONFIG_FILES = sorted((REPO / "jobs" / "configs").rglob("*.yaml"))
DEMO = REPO / "jobs" / "configs" / "demo" / "features.yaml"
MINIMAL = ["input=/data/images", "output=/out"]


def test_shipped_configs_exist() -> None:
    assert DEMO in CONFIG_FILES
    assert sum(p.stem == "features" for p in CONFIG_FILES) >= 2


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path) -> None:
    stage = path.stem.split("-")[0]  # align-student.yaml is an align config
    assert stage in CONFIGS, f"{path}: no stage {stage!r}; name configs <stage>[-variant].yaml"
    cfg = resolve_config(CONFIGS[stage], path, name=stage)  # a stage's, or the pipeline's
    assert isinstance(cfg, CONFIGS[stage])
    if stage in STAGE_CONFIGS:
        assert load_config(stage, path) == cfg
    # the resolved config round-trips through its YAML dump
    assert (
        resolve_config(
            CONFIGS[stage],
            None,
            [
                f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                for k, v in yaml.safe_load(dump_config(cfg)).items()
            ],
            name=stage,
        )
        == cfg
    )


def test_features_configs_load_with_their_values() -> None:
    for path in CONFIG_FILES:
        if path.stem == "features":
            assert isinstance(load_config("features", path), FeaturesConfig)
    demo = load_config("features", DEMO)
    assert demo.input == [SourceConfig(uri=os.path.abspath("runs/demo/data/images"))]
    assert demo.output == os.path.abspath("runs/demo/features")
    assert demo.clip == ClipConfig(name="cskd-tiny-vit", pretrained=None, seed=0)
    ava = load_config("features", REPO / "jobs" / "configs" / "ava" / "features.yaml")
    assert [s.weight for s in ava.input] == [2.0, 1.0, 1.0]
    assert ava.input[1].max_images == 1_000_000 and ava.input[2].suffixes == [".jpg"]
    assert ava.clip.pretrained == "openai" and ava.precision == "fp16"


def test_defaults() -> None:
    cfg = load_config("features", None, MINIMAL)
    assert cfg.batch_size == 64 and cfg.decode_batch_size == 16 and cfg.concurrency == 1
    assert cfg.precision == "auto" and cfg.feature_dtype == "float16"
    assert cfg.max_images is None and cfg.seed == 0 and cfg.max_pixels == DEFAULT_MAX_PIXELS
    assert cfg.num_gpus_per_actor is None and cfg.shard_rows == 4096
    assert cfg.clip == ClipConfig()


# ---------------------------------------------------------------- overrides


def test_set_overrides_are_yaml_typed() -> None:
    cfg = load_config(
        "features",
        DEMO,
        [
            "batch_size=8",
            "clip.pretrained=null",
            "clip.seed=3",
            "max_images=1000",
            "num_cpus_per_actor=0.5",
            "clip.name=ViT-B-32",
        ],
    )
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.clip.pretrained is None
    assert cfg.clip.seed == 3 and cfg.clip.name == "ViT-B-32"
    assert cfg.num_cpus_per_actor == 0.5
    assert cfg.max_images == 1000


def test_set_nested_key_creates_section() -> None:
    cfg = load_config("features", None, [*MINIMAL, "clip.pretrained=openai"])
    assert cfg.clip == ClipConfig(pretrained="openai")


def test_set_input_list_of_sources() -> None:
    cfg = load_config("features", DEMO, ["input=[{uri: a, weight: 2}, b]"])
    assert cfg.input == [SourceConfig(uri=os.path.abspath("a"), weight=2.0), SourceConfig(uri=os.path.abspath("b"))]


def test_local_paths_become_absolute_and_s3_uris_stay() -> None:
    cfg = load_config("teacher", None, ["labels.images_root=imgs", "aligned=s3://bucket/model"],
                      input_uris=["labels/AVA.txt"], output_uri="out")
    assert cfg.input == os.path.abspath("labels/AVA.txt") and cfg.output == os.path.abspath("out")
    assert cfg.labels.images_root == os.path.abspath("imgs") and cfg.aligned == "s3://bucket/model"


def test_input_and_output_flags_override_file() -> None:
    cfg = load_config(
        "features", DEMO, ["output=/ignored"], input_uris=["s3://b/x", "/local"], output_uri="s3://o"
    )
    assert cfg.input == [SourceConfig(uri="s3://b/x"), SourceConfig(uri="/local")]
    assert cfg.output == "s3://o"


def test_string_input_becomes_one_source(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input: /data/photos\noutput: /out\n")
    assert load_config("features", path).input == [SourceConfig(uri="/data/photos")]
    path.write_text("input: {uri: /data/m.csv, weight: 3}\noutput: /out\n")
    assert load_config("features", path).input == [SourceConfig(uri="/data/m.csv", weight=3.0)]


@pytest.mark.parametrize(
    ("item", "keys", "value"),
    [
        ("batch_size=8", ["batch_size"], 8),
        ("clip.pretrained=null", ["clip", "pretrained"], None),
        ("a.b.c=x=y", ["a", "b", "c"], "x=y"),
        (" seed = 3", ["seed"], 3),
        ("output=", ["output"], ""),
        ("flag=true", ["flag"], True),
        ("xs=[1, 2]", ["xs"], [1, 2]),
        ("f=1.5", ["f"], 1.5),
    ],
)
def test_parse_override(item: str, keys: list[str], value: object) -> None:
    assert parse_override(item) == (keys, value)


def test_malformed_set_without_equals() -> None:
    with pytest.raises(
        ConfigError, match=r"^--set 'batch_size': expected key=value, e\.g\. --set batch_size=32$"
    ):
        load_config("features", DEMO, ["batch_size"])


def test_malformed_set_empty_key() -> None:
    with pytest.raises(ConfigError, match=r"^--set '=3': empty key$"):
        load_config("features", DEMO, ["=3"])


def test_malformed_set_bad_yaml() -> None:
    with pytest.raises(ConfigError, match=r"^--set 'batch_size=\[1': value is not valid YAML"):
        load_config("features", DEMO, ["batch_size=[1"])


def test_set_into_a_non_section() -> None:
    with pytest.raises(ConfigError, match=r"^--set batch_size\.x: 'batch_size' is not a section$"):
        load_config("features", DEMO, ["batch_size.x=1"])


# ---------------------------------------------------------------- errors


def test_unknown_top_level_key_suggests_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("features", DEMO, ["batch_sise=3"])
    valid = ", ".join(sorted(FeaturesConfig.model_fields))
    assert str(info.value) == (
        f"{DEMO}: unknown key 'batch_sise' in features config (did you mean 'batch_size'?); "
        f"valid keys: {valid}"
    )


def test_unknown_key_without_close_match_has_no_hint() -> None:
    with pytest.raises(
        ConfigError, match=r"^<defaults>: unknown key 'zzz' in features config; valid keys: batch_size,"
    ):
        load_config("features", None, [*MINIMAL, "zzz=1"])


def test_unknown_nested_clip_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'clip\.nam' in features config \(did you mean 'name'\?\); "
        r"valid keys: name, pretrained, seed$",
    ):
        load_config("features", DEMO, ["clip.nam=x"])


def test_unknown_key_in_a_source(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input:\n  - uri: /a\n    wieght: 2\noutput: /out\n")
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(path))}: unknown key 'input\.0\.wieght' in features config "
        r"\(did you mean 'weight'\?\); valid keys: image_column, kind, max_images, suffixes, uri, "
        r"weight$",
    ):
        load_config("features", path)


def test_bad_literal_names_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^.*features\.yaml: precision: Input should be 'auto', 'fp32', 'fp16' or "
        r"'bf16' \(got 'fp8'\)$",
    ):
        load_config("features", DEMO, ["precision=fp8"])


def test_bad_source_kind_names_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"input\.0\.kind: Input should be 'auto', 'listing', 'manifest', 'webdataset' or 'image_parquet' "
        r"\(got 'dir'\)",
    ):
        load_config("features", DEMO, ["input=[{uri: a, kind: dir}]"])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("batch_size=0", r"batch_size: Input should be greater than or equal to 1 \(got 0\)"),
        ("batch_size=abc", r"batch_size: Input should be a valid integer.* \(got 'abc'\)"),
        ("num_cpus_per_actor=0", r"num_cpus_per_actor: Input should be greater than 0 \(got 0\)"),
        ("input=[{uri: a, weight: -1}]", r"input\.0\.weight: Input should be greater than 0 \(got -1\)"),
        ("feature_dtype=float64", r"feature_dtype: Input should be 'float16' or 'float32' \(got 'float64'\)"),
    ],
)
def test_bad_values_name_key_and_value(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("features", DEMO, [item])


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"^<defaults>: missing required key 'output' in features config$"):
        load_config("features", None, ["input=/x"])


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: config file not found$"):
        load_config("features", path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: a config must be a mapping of keys to values$"
    ):
        load_config("features", path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input: [a\noutput: b\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid YAML"):
        load_config("features", path)


def test_unknown_stage_lists_stages() -> None:
    from cskd_ray.stages import STAGE_CONFIGS

    assert {"features", "align", "teacher", "label"} <= set(STAGE_CONFIGS)
    with pytest.raises(ConfigError, match=rf"^unknown stage 'train'; valid stages: {', '.join(STAGE_CONFIGS)}$"):
        load_config("train")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_assignment_is_validated() -> None:
    cfg = load_config("features", DEMO)
    with pytest.raises(ValueError, match="precision"):
        cfg.precision = "fp8"  # type: ignore[assignment]


def test_dump_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("features", DEMO, ["batch_size=8", "input=[{uri: a, weight: 2, suffixes: [.jpg]}]"])
    path = tmp_path / "resolved_config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config("features", path) == cfg
    assert list(yaml.safe_load(path.read_text()))[:2] == ["input", "output"]
