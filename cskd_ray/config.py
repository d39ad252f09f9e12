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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cskd_ray.data.decode import DEFAULT_MAX_PIXELS
from cskd_ray.tracking import TrackingConfig


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
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each model actor.")
    num_gpus_per_actor: float | None = Field(None, ge=0, description="null: 1 when the cluster has GPUs.")
    torch_threads: int = Field(0, ge=0, description="CPU threads per actor; 0: the machine's cores / actors.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images are refused (bombs).")
    shard_rows: int = Field(4096, ge=1, description="Rows per output Parquet shard.")
    object_store_mb: int = Field(
        256, ge=16, description="Object store memory the pass may hold at once (Ray Data resource limit), so memory "
        "stays flat whatever the number of images."
    )

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

    clip: ClipConfig = Field(default_factory=ClipConfig, description="The frozen CLIP image encoder.")
    feature_dtype: Literal["float16", "float32"] = Field("float16", description="How cached features are stored.")
    tokens: bool = Field(
        False, description="Also store CLIP's patch-token map (grid² × width values per image) for the "
        "smooth_l1_tokens alignment; ViT CLIP models only. ViT-L-14 at 224 px: 256 × 1024 values, 512 KiB per "
        "image in float16.")


class LabelConfig(ImagePassConfig):
    """Phase 2b: the teacher scores the unlabeled images → pseudo-label table (Parquet)."""

    model: str = Field(description="Model folder written by teacher (or distill): output/model.")


class ScoreConfig(LabelConfig):
    """Bulk scoring of any collection with a trained or exported model (``cskd-ray score``)."""

    model: str = Field(description="Model folder written by teacher or distill (output/model), or by export.")
    min_score: float | None = Field(
        None, description="Also write OUTPUT/min_score-<t>.csv: the URIs (and scores) at or above this score."
    )
    shard_rows: int = Field(1024, ge=1, description="Rows per output Parquet shard (a kill loses at most these).")


class EncoderConfig(StrictModel):
    """A timm encoder plus the projection head that maps its pooled features into CLIP's space."""

    name: str = Field("test_vit", description="Any timm model name (see cskd-ray list-models encoders).")
    pretrained: bool | str = Field(False, description="false: random; true: timm's weights; or a checkpoint path/URI.")
    projection: Literal["linear", "mlp"] = Field(
        "linear", description="Projection head P into CLIP's space: linear, or a 2-layer MLP with GELU.")


TRAIN_DESCRIPTION = "How training runs: Ray Train workers, optimiser, checkpoints."
DECODE_BATCH_DESCRIPTION = "Images per decode task batch."
MAX_PIXELS_DESCRIPTION = "Larger images are refused (decompression bombs)."


class TrainerConfig(StrictModel):
    """How a Ray Train stage runs: workers, optimisation, checkpoints, failures."""

    num_workers: int = Field(1, ge=1, description="DDP workers.")
    use_gpu: bool | None = Field(None, description="null: use GPUs when the cluster has them.")
    cpus_per_worker: float = Field(0.5, gt=0, description="0.5 leaves room for Ray Data on small machines.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (Ray placement group strategy); SPREAD: one per node "
        "where possible.")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many steps in total (the LR schedule still spans all epochs)."
    )
    batch_size: int = Field(32, ge=1, description="Global batch size (split evenly across workers).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup, then cosine decay to zero.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 turns clipping off.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on GPU, fp32 on CPU.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (one is also kept at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best by val_srcc when the stage "
                                  "validates, else the latest.")
    max_failures: int = Field(0, ge=0, description="Worker failures to recover from (restart from checkpoint).")
    shuffle: bool = Field(True, description="Shuffle within a local buffer each epoch (seeded).")
    deterministic: bool = Field(
        False, description="Keep Ray Data's row order (slower ingest) so a run can be repeated bit for bit, and a "
        "resumed run sees exactly the batches it had not trained on yet."
    )
    seed: int = Field(0, description="Seed of weights initialisation, shuffling and sampling.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking of this run and of Tune sweeps over it "
        "(MLflow or W&B; off by default), see cskd_ray.tracking.")


class AlignConfig(StrictModel):
    """Phase 1: align a timm encoder + projection to cached CLIP features of unlabeled images."""

    input: str = Field(description="Feature cache URI written by the features stage.")
    output: str = Field(description="Run folder: checkpoints under train/, the aligned model under model/.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="The student encoder to align.")
    loss: Literal["cosine", "mse", "smooth_l1_tokens"] = Field(
        "cosine", description="Alignment loss (cskd_ray.losses); smooth_l1_tokens needs a cache written with "
        "tokens: true and a ViT encoder whose token grid matches CLIP's.")
    token_beta: float = Field(2.0, gt=0, description="β of smooth_l1_tokens.")
    train: TrainerConfig = Field(default_factory=TrainerConfig, description=TRAIN_DESCRIPTION)
    decode_batch_size: int = Field(32, ge=1, description=DECODE_BATCH_DESCRIPTION)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=MAX_PIXELS_DESCRIPTION)

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return _single_input(value)


class LabelsConfig(StrictModel):
    """Where the labels are and how to read them (see ``cskd_ray.data.labels.load_labels``)."""

    format: Literal["ava", "aadb", "para", "tad66k", "koniq", "spaq", "csv", "parquet"] = Field(
        "ava", description="Label file format (cskd_ray.data.labels).")
    images_root: str | None = Field(None, description="Folder or s3:// prefix the label file's names are under.")
    test_list: str | None = Field(None, description="AVA: the official test list (image ids), gives the split.")
    val_split: str = Field("test", description="Rows of this split validate; all other rows train.")
    threshold: float | None = Field(None, description="Accuracy threshold; null: 5 for 10-bin labels, else midpoint.")


class TeacherConfig(StrictModel):
    """Phase 2a: an aligned encoder + aesthetic head trained on labels (the teacher)."""

    input: str = Field(description="Label file (local path or s3:// URI) in `labels.format`.")
    output: str = Field(description="Run folder: checkpoints under train/, the best model under model/.")
    aligned: str | None = Field(None, description="Aligned model folder (align's output/model); null: `encoder`.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="The encoder when `aligned` is null.")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="How to read the label file.")
    head: Literal["auto", "distribution", "scalar"] = Field(
        "auto", description="auto: a distribution head when the labels have distributions."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the aesthetic head's linear layer.")
    train: TrainerConfig = Field(default_factory=TrainerConfig, description=TRAIN_DESCRIPTION)
    decode_batch_size: int = Field(32, ge=1, description=DECODE_BATCH_DESCRIPTION)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=MAX_PIXELS_DESCRIPTION)

    @field_validator("input", mode="before")
    @classmethod
    def _one_input(cls, value: Any) -> Any:
        return _single_input(value)


class ExtraTeacherConfig(StrictModel):
    """One extra frozen feature teacher (multi-teacher distillation, arXiv 2206.00809)."""

    kind: Literal["clip", "timm"] = Field(description="clip: an open_clip image tower; timm: a timm model's "
                                                      "pooled features (e.g. an ImageNet classifier).")
    name: str = Field(description="open_clip model name (kind clip) or timm model name (kind timm).")
    pretrained: bool | str | None = Field(
        None, description="clip: open_clip tag, checkpoint path or s3:// URI; timm: true for timm's weights or a "
        "checkpoint path; null/false: random weights (only useful in tests).")
    weight: float = Field(1.0, ge=0, description="w_t, this teacher's weight in the loss.")
    projection: Literal["linear", "mlp"] = Field("linear", description="The student's head P_t into its space.")
    seed: int = Field(0, description="Seed of random CLIP weights.")


class AugmentConfig(StrictModel):
    """Strong augmentation of the consistency term (the teacher sees a flip only); see cskd_ray.train.augment."""

    crop_scale: float = Field(0.5, gt=0, le=1, description="Smallest crop area fraction of the random resized crop.")
    jitter: float = Field(0.4, ge=0, lt=1, description="Brightness/contrast/saturation factors in [1 − j, 1 + j].")
    noise: float = Field(0.03, ge=0, description="Std of added Gaussian noise (pixels in [0, 1]).")


class DistillConfig(TeacherConfig):
    """Phase 2c: the aligned student learns from labels, the teacher's pseudo-labels and CLIP features.

    L = L_sup + kd_weight · D(student, pseudo-labels) + feat_weight · (1 − cos(P'(E_s(x)), C(x)))
        + consistency_weight · D(student(strong(x_u)), teacher(weak(x_u)))
        + Σ_t w_t · (1 − cos(P_t(E_s(x)), T_t(x)))   over extra_teachers.
    """

    pseudo_labels: str = Field(description="Pseudo-label table written by `label` (the unlabeled images).")
    features: str | None = Field(None, description="Feature cache for the feature term; needed when feat_weight > 0.")
    kd_weight: float = Field(1.0, ge=0, description="λ_kd; 0 turns the pseudo-label term off.")
    feat_weight: float = Field(0.0, ge=0, description="λ_feat; 0 turns the CLIP feature term off.")
    max_unlabeled: int | None = Field(None, ge=1, description="Use at most this many pseudo-labeled images.")
    consistency_weight: float = Field(0.0, ge=0, description="λ_cons; > 0 runs `teacher_model` online on weakly "
                                                              "augmented unlabeled images.")
    teacher_model: str | None = Field(None, description="The teacher's model folder (teacher's output/model); "
                                                         "needed when consistency_weight > 0.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Strong view of the consistency term.")
    extra_teachers: list[ExtraTeacherConfig] = Field(
        default_factory=list, description="Extra frozen feature teachers, each with its own P_t and weight w_t.")

    @model_validator(mode="after")
    def _teacher_for_consistency(self) -> DistillConfig:
        if self.consistency_weight > 0 and not self.teacher_model:
            raise ValueError("consistency_weight > 0 needs teacher_model (the teacher's output/model folder)")
        return self


PIPELINE_STAGES = ("features", "align_teacher", "align_student", "teacher", "label", "distill", "evaluate", "score")


class PipelineStageConfig(StrictModel):
    """One stage of the pipeline job: its YAML config plus ``--set`` overrides (paths are wired by the job)."""

    config: str | None = Field(None, description="The stage's YAML config; null: the stage's defaults.")
    set: list[str] = Field(default_factory=list, description="Overrides, as for --set key=value.")


class DemoDataConfig(StrictModel):
    """Generate demo data into ``output`` first (skipped when it is already there)."""

    output: str = Field(description="Folder for the demo images, AVA.txt, test.jpgl and manifests.")
    num_images: int = Field(200, ge=10, description="Images to generate.")
    labeled_fraction: float = Field(0.25, gt=0, lt=1, description="Share of the images that get labels.")
    image_size: int = Field(64, ge=32, description="Side of the generated images in pixels.")
    num_corrupt: int = Field(3, ge=0, description="Broken files added (they must become error rows).")
    seed: int = Field(0, description="Seed of the generated images and labels.")


class PipelineConfig(StrictModel):
    """The whole CSKD pipeline as one job, every stage writing under ``output``; complete stages are skipped.

    Order: features → align (teacher, student) → teacher → label → distill → evaluate → score.
    """

    input: list[str] = Field(description="Unlabeled images: folders, prefixes, globs or manifests.")
    output: str = Field(description="Run folder; each stage writes to a sub-folder named after it.")
    label_file: str = Field(description="Label file for teacher, distill and evaluate (in labels.format).")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="How to read `label_file`.")
    score_input: list[str] | None = Field(None, description="Images to bulk-score; null: `input`.")
    demo_data: DemoDataConfig | None = Field(None, description="Generate demo data before the first stage.")
    stages: dict[Literal[PIPELINE_STAGES], PipelineStageConfig] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Per-stage config and overrides; a stage not listed uses defaults.")
    skip: list[Literal[PIPELINE_STAGES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Stages not to run (their outputs must exist when later stages need them).")

    @field_validator("input", "score_input", mode="before")
    @classmethod
    def _string_is_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


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


class TuneConfig(StrictModel):
    """A Ray Tune sweep: each trial runs ``stage`` with ``config`` + ``set`` + values sampled from ``search``.

    Trials write under ``output/trials/<trial_id>``; the sweep writes ``trials.parquet``/``trials.csv`` and
    ``best_config.yaml`` to ``output`` and keeps Tune's own state in ``output/tune`` (for ``--resume``).
    """

    stage: Literal["align", "teacher", "distill"] = Field(description="The training stage every trial runs.")
    config: str = Field(description="The stage's YAML config every trial starts from.")
    set: list[str] = Field(default_factory=list, description="Overrides of `config`, as for --set key=value.")
    input: list[str] | None = Field(None, description="Overrides the stage's input (as its --input does).")
    output: str = Field(description="Experiment folder (local or s3://).")
    search: dict[str, SearchDimension] = Field(
        min_length=1, description="Dotted stage-config key → domain, e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}.")
    metric: str | None = Field(None, description="Reported metric to rank by; null: cosine for align, else val_srcc.")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or a lower `metric` is better.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="When trials stop.")
    num_samples: int = Field(4, ge=1, description="Samples of the space (each grid point is sampled this often).")
    max_concurrent: int | None = Field(
        None, ge=1, description="null: cluster CPUs / (workers × cpus_per_worker + data_cpus_per_trial), and GPUs.")
    data_cpus_per_trial: float = Field(0.5, ge=0, description="CPUs left per trial for its Ray Data decode tasks.")
    seed: int | None = Field(0, description="Seed of the sampled values; null: a different sweep every time.")
    top_k: int = Field(5, ge=1, description="Trials printed at the end.")

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("search", mode="before")
    @classmethod
    def _flatten_search(cls, value: Any) -> Any:
        """Nested sections (``train: {lr: {choice: ...}}``, or ``--set search.train.lr.choice=...``) → dotted keys."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, spec in value.items():
            if isinstance(spec, dict) and spec and not set(spec) & set(SEARCH_KINDS):
                flat.update({f"{key}.{sub}": inner for sub, inner in cls._flatten_search(spec).items()})
            else:
                flat[str(key)] = spec
        return flat


STAGE_CONFIGS: dict[str, type[StrictModel]] = {"features": FeaturesConfig, "align": AlignConfig,
                                               "teacher": TeacherConfig, "label": LabelConfig, "score": ScoreConfig,
                                               "distill": DistillConfig, "pipeline": PipelineConfig,
                                               "tune": TuneConfig}


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
