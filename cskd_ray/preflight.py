"""Checks that run on the driver before Ray starts: every mistake a user can fix fails here, in seconds.

A stage's driver (``cli.py``, ``jobs/*.py``) calls :func:`check_stage` right after loading the config
and before ``init_ray()``. Each check raises the error type the CLI turns into one ``error:`` line that
names the key or path and the valid choices (exit status 2): URIs with an unknown scheme, outputs that
cannot be created, inputs that do not exist, unknown model names, label files that do not parse in the
configured format, and batch sizes that cannot be split across the workers. Nothing is written.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from cskd_ray import storage
from cskd_ray.config import URI_FIELDS, ConfigError


def _uri_fields(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every URI-valued field in a config, nested sources included."""
    found: list[tuple[str, str]] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += _uri_fields(item, f"{prefix}.{i}" if prefix else str(i))
        return found
    if not isinstance(node, BaseModel):
        return found
    for name in type(node).model_fields:
        value, key = getattr(node, name), f"{prefix}.{name}" if prefix else name
        if name in URI_FIELDS and isinstance(value, str) and value:
            found.append((key, value))
        elif isinstance(value, (BaseModel, list)):
            found += _uri_fields(value, key)
    return found


def check_uri_schemes(cfg: BaseModel) -> None:
    """Every URI field must be a local path, ``file://`` or ``s3://`` (with a bucket); ``model`` may be a Hub model.

    Raises:
        ConfigError: Naming the key, the URI and the accepted forms.
    """
    for key, uri in _uri_fields(cfg):
        if key == "model" and uri.startswith("hf-hub:"):
            continue  # hf-hub:org/name[@revision] (cskd_ray.models.hub), checked when the model is described
        try:
            storage.resolve(uri)
        except storage.StorageError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def check_output(uri: str, key: str = "output") -> None:
    """A local output folder must be creatable: its nearest existing ancestor is a writable folder.

    Object-storage outputs are checked by their scheme only (a bucket's permissions show on the first write).

    Raises:
        ConfigError: The output is an existing file, or sits under a file or an unwritable folder.
    """
    if storage.is_remote(uri):
        return
    path = storage.resolve(uri)[1]
    if os.path.isfile(path):
        raise ConfigError(f"{key} {uri}: is an existing file; an output must be a folder (new or existing)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key} {uri}: cannot create it: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {uri}: cannot create or write it: {parent} is not writable")


def _check_exists(key: str, uri: str | None, what: str) -> None:
    if uri and not storage.exists(uri):
        raise ConfigError(f"{key} {uri}: no such {what}")


def _check_sources(cfg: Any) -> None:
    """Every input source exists (for a glob: the folder before its first wildcard); nothing is listed yet."""
    for i, source in enumerate(cfg.input):
        uri = source.uri
        glob_at = min((uri.find(c) for c in storage.GLOB_CHARS if c in uri), default=-1)
        base = uri[:glob_at].rsplit("/", 1)[0] if glob_at >= 0 else uri
        if base and not storage.exists(base):
            raise ConfigError(f"input.{i}.uri {uri}: no such file, directory or prefix")


def _check_clip(cfg: Any) -> None:
    from cskd_ray.models.registry import _unknown, list_clip_models

    name = cfg.clip.name
    if not name.startswith("hf-hub:") and name not in list_clip_models():
        raise ConfigError(f"clip.name: {_unknown('CLIP', name, list_clip_models())}")


def _check_encoder(cfg: Any) -> None:
    """The encoder name must be a timm model (or ``aligned`` a model folder)."""
    aligned = getattr(cfg, "aligned", None)
    if aligned:
        if not storage.exists(storage.join(aligned, "model.json")):
            raise ConfigError(f"aligned {aligned}: not a model folder (no model.json); run `align` first and pass "
                              "its output/model")
        return
    import timm

    from cskd_ray.models.registry import _unknown, list_encoders

    if not timm.is_model(cfg.encoder.name):
        raise ConfigError(f"encoder.name: {_unknown('timm encoder', cfg.encoder.name, list_encoders())}")


def _check_batch(cfg: Any) -> None:
    world, batch = cfg.train.num_workers, cfg.train.batch_size
    if batch % world:
        raise ConfigError(f"train.batch_size {batch} must be a multiple of train.num_workers {world}")


def _check_labels(cfg: Any) -> None:
    from cskd_ray.data.labels import load_labels

    _check_exists("input", cfg.input, "label file")
    _check_exists("labels.test_list", cfg.labels.test_list, "test list file")
    load_labels(cfg.labels.format, cfg.input, cfg.labels.images_root, test_list=cfg.labels.test_list)


def check_stage(stage: str, cfg: Any) -> None:
    """Run the checks for ``stage`` (``features``, ``align``, ``teacher``, ``label``, ``distill``).

    Raises:
        ConfigError, cskd_ray.data.labels.LabelFormatError, cskd_ray.data.sources.SourceError,
        cskd_ray.models.WeightsUnavailableError: A user-fixable mistake, named in the message.
    """
    check_uri_schemes(cfg)
    check_output(cfg.output)
    if stage in ("features", "label", "score"):
        _check_sources(cfg)
    if stage == "features":
        _check_clip(cfg)
    elif stage == "align":
        from cskd_ray.feature_cache import FeatureCache

        cache = FeatureCache(cfg.input)
        if cache.read_meta() is None or not cache.shards():
            raise ConfigError(f"input {cfg.input}: not a feature cache (no _meta.json or shards); run `features` first")
        _check_encoder(cfg)
        _check_batch(cfg)
    elif stage in ("teacher", "distill"):
        _check_labels(cfg)
        _check_batch(cfg)
        _check_encoder(cfg)
        if stage == "distill":
            from cskd_ray.feature_cache import META_FILE

            if not storage.exists(storage.join(cfg.pseudo_labels, META_FILE)):
                raise ConfigError(f"pseudo_labels {cfg.pseudo_labels}: not a pseudo-label table; run `label` first")
            if cfg.feat_weight > 0 and not cfg.features:
                raise ConfigError("features: feat_weight > 0 needs `features`, the unlabeled images' feature cache")
            if cfg.feat_weight > 0 and not storage.exists(cfg.features):  # only the feature term reads it
                raise ConfigError(f"features {cfg.features}: no such feature cache; run `features` first")
    elif stage == "label":
        if not storage.exists(storage.join(cfg.model, "model.json")):  # cheap, before importing torch
            raise ConfigError(f"model {cfg.model}: not a model folder (no model.json); run `teacher` first and "
                              "pass its output/model")
        from cskd_ray.models.saved import describe_scoring_model

        describe_scoring_model(cfg.model)
