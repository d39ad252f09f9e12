"""Typed, validated stage configs: defaults, then a YAML file, then ``--set key=value`` overrides.

Every stage has one pydantic model here. Unknown keys are errors that list the valid keys; a value of
the wrong type or outside its choices names the key and what is allowed. The resolved config is saved
next to every output (``resolved_config.yaml``).
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cskd_ray.data.decode import DEFAULT_MAX_PIXELS


def _single_input(value: Any) -> Any:
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


class SourceConfig(StrictModel):
    """One input source: a directory/prefix, a glob, or a manifest (CSV/Parquet with a ``uri`` column)."""

    uri: str = Field(description="Local path or s3:// URI of a directory, prefix, glob or manifest file.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source when sources are mixed.")
    max_images: int | None = Field(None, ge=1, description="Cap on the images taken from this source.")
    suffixes: list[str] | None = Field(None, description="Keep only names with these endings, e.g. [.jpg].")
    kind: Literal["auto", "listing", "manifest"] = Field(
        "auto", description="auto: a .csv/.parquet file is a manifest, anything else is listed."
    )


class ClipConfig(StrictModel):
    """The frozen CLIP image encoder whose features are cached."""

    name: str = Field("cskd-tiny-vit", description="open_clip model name or hf-hub:org/repo.")
    pretrained: str | None = Field(
        None, description="open_clip tag (openai, laion2b_...), checkpoint path, s3:// URI, or null for random."
    )
    seed: int = Field(0, description="Seed of random weights, so every actor builds the same model.")


class ImagePassConfig(StrictModel):
    """Keys shared by the stages that run a model over many images with Ray Data (features, label)."""

    input: list[SourceConfig] = Field(description="Input sources (a plain string is a source URI).")
    output: str = Field(description="Output table URI (local folder or s3:// prefix), one row per input.")
    max_images: int | None = Field(None, ge=1, description="Total cap; sources share it by weight.")
    seed: int = Field(0, description="Seed for sampling under caps and for mixing order.")
    batch_size: int = Field(64, ge=1, description="Images per model forward pass.")
    decode_batch_size: int = Field(16, ge=1, description="Images per decode task batch.")
    decode_num_cpus: float = Field(
        0.5, gt=0, description="CPUs per read/decode task; unlike the actors' value, so Ray does not fuse decoding "
        "into the actors (it then overlaps model start-up and compute)."
    )
    concurrency: int = Field(1, ge=1, description="Number of model actors.")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float | None = Field(None, ge=0, description="null: 1 when the cluster has GPUs.")
    torch_threads: int = Field(0, ge=0, description="CPU threads per actor; 0: the machine's cores / actors.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images are refused (bombs).")
    shard_rows: int = Field(4096, ge=1, description="Rows per output Parquet shard.")

    @field_validator("input", mode="before")
    @classmethod
    def _strings_are_sources(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"uri": v} if isinstance(v, str) else v for v in value]
        return value


class FeaturesConfig(ImagePassConfig):
    """The features stage: sources → decode → CLIP actors → Parquet feature cache."""

    clip: ClipConfig = Field(default_factory=ClipConfig)
    feature_dtype: Literal["float16", "float32"] = "float16"


class LabelConfig(ImagePassConfig):
    """Phase 2b: the teacher scores the unlabeled images → pseudo-label table (Parquet)."""

    model: str = Field(description="Model folder written by teacher (or distill): output/model.")


class EncoderConfig(StrictModel):
    """A timm encoder plus the projection head that maps its pooled features into CLIP's space."""

    name: str = Field("test_vit", description="Any timm model name (see cskd-ray list-models encoders).")
    pretrained: bool | str = Field(False, description="false: random; true: timm's weights; or a checkpoint path/URI.")
    projection: Literal["linear", "mlp"] = "linear"


class TrainerConfig(StrictModel):
    """How a Ray Train stage runs: workers, optimisation, checkpoints, failures."""

    num_workers: int = Field(1, ge=1, description="DDP workers.")
    use_gpu: bool | None = Field(None, description="null: use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(0.5, gt=0, description="0.5 leaves room for Ray Data on small machines.")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many steps in total (the LR schedule still spans all epochs)."
    )
    batch_size: int = Field(32, ge=1, description="Global batch size (split evenly across workers).")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(10, ge=0, description="Linear warmup, then cosine decay to zero.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 turns clipping off.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU, fp32 on CPU.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (one is also kept at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="Worker failures to recover from (restart from checkpoint).")
    shuffle: bool = Field(True, description="Shuffle within a local buffer each epoch (seeded).")
    deterministic: bool = Field(
        False, description="Keep Ray Data's row order (slower ingest) so a run can be repeated bit for bit."
    )
    seed: int = 0


class AlignConfig(StrictModel):
    """Phase 1: align a timm encoder + projection to cached CLIP features of unlabeled images."""

    input: str = Field(description="Feature cache URI written by the features stage.")
    output: str = Field(description="Run folder: checkpoints under train/, the aligned model under model/.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    loss: Literal["cosine", "mse"] = Field("cosine", description="Alignment loss (cskd_ray.losses).")
    train: TrainerConfig = Field(default_factory=TrainerConfig)
    decode_batch_size: int = Field(32, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return _single_input(value)


class LabelsConfig(StrictModel):
    """Where the labels are and how to read them (see ``cskd_ray.data.labels.load_labels``)."""

    format: Literal["ava", "aadb", "para", "tad66k", "koniq", "spaq", "csv", "parquet"] = "ava"
    images_root: str | None = Field(None, description="Folder or s3:// prefix the label file's names are under.")
    test_list: str | None = Field(None, description="AVA: the official test list (image ids), gives the split.")
    val_split: str = Field("test", description="Rows of this split validate; all other rows train.")
    threshold: float | None = Field(None, description="Accuracy threshold; null: 5 for 10-bin labels, else midpoint.")


class TeacherConfig(StrictModel):
    """Phase 2a: an aligned encoder + aesthetic head trained on labels (the teacher)."""

    input: str = Field(description="Label file (local path or s3:// URI) in `labels.format`.")
    output: str = Field(description="Run folder: checkpoints under train/, the best model under model/.")
    aligned: str | None = Field(None, description="Aligned model folder (align's output/model); null: `encoder`.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    head: Literal["auto", "distribution", "scalar"] = Field(
        "auto", description="auto: a distribution head when the labels have distributions."
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    train: TrainerConfig = Field(default_factory=TrainerConfig)
    decode_batch_size: int = Field(32, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return _single_input(value)


class DistillConfig(TeacherConfig):
    """Phase 2c: the aligned student learns from labels, the teacher's pseudo-labels and CLIP features.

    L = L_sup + kd_weight · D(student, pseudo-labels) + feat_weight · (1 − cos(P'(E_s(x)), C(x))).
    """

    pseudo_labels: str = Field(description="Pseudo-label table written by `label` (the unlabeled images).")
    features: str | None = Field(None, description="Feature cache for the feature term; needed when feat_weight > 0.")
    kd_weight: float = Field(1.0, ge=0, description="λ_kd; 0 turns the pseudo-label term off.")
    feat_weight: float = Field(0.0, ge=0, description="λ_feat; 0 turns the CLIP feature term off.")
    max_unlabeled: int | None = Field(None, ge=1, description="Use at most this many pseudo-labeled images.")


STAGE_CONFIGS: dict[str, type[StrictModel]] = {"features": FeaturesConfig, "align": AlignConfig,
                                               "teacher": TeacherConfig, "label": LabelConfig,
                                               "distill": DistillConfig}


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


def load_config(
    stage: str,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    input_uris: list[str] | None = None,
    output_uri: str | None = None,
) -> StrictModel:
    """Build a stage config from a YAML file, ``--set`` overrides and ``--input``/``--output`` flags.

    Raises:
        ConfigError: The file is missing or not a mapping, a key is unknown, or a value is invalid.
    """
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGE_CONFIGS)}")
    model = STAGE_CONFIGS[stage]
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


URI_FIELDS = ("input", "output", "uri", "aligned", "images_root", "test_list", "model", "pseudo_labels", "features")


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
        if name in URI_FIELDS and isinstance(value, str) and value and "://" not in value:
            object.__setattr__(node, name, os.path.abspath(os.path.expanduser(value)))
        else:
            _absolutize(value)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what is saved next to outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
