"""The path checks every stage runs on the driver before Ray starts: every mistake a user can fix fails here.

Each stage's ``check(cfg)`` (reached through :func:`cskd_ray.stages.check_stage`, which the commands call
right after loading the config and before ``init_ray()``) starts with :func:`check_paths` and adds its own
(unknown model names, label files that do not parse, batch sizes that cannot be split across workers).
Each check raises the error type the CLI turns into one ``error:`` line that names the key or path and the
valid choices (exit status 2): URIs with an unknown scheme, outputs that cannot be created, inputs that do
not exist. Nothing is written.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from cskd_ray.config import URI_FIELDS, ConfigError
from cskd_ray.io import storage


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


def check_exists(key: str, uri: str | None, what: str) -> None:
    """``uri`` (when given) exists; the error names ``key`` and ``what`` it should be."""
    if uri and not storage.exists(uri):
        raise ConfigError(f"{key} {uri}: no such {what}")


def check_sources(cfg: Any) -> None:
    """Every input source exists (for a glob: the folder before its first wildcard); nothing is listed yet."""
    for i, source in enumerate(cfg.input):
        uri = source.uri
        glob_at = min((uri.find(c) for c in storage.GLOB_CHARS if c in uri), default=-1)
        base = uri[:glob_at].rsplit("/", 1)[0] if glob_at >= 0 else uri
        if base and not storage.exists(base):
            raise ConfigError(f"input.{i}.uri {uri}: no such file, directory or prefix")


def check_paths(cfg: Any) -> None:
    """Every URI of the config has a known scheme, and its ``output`` can be created."""
    check_uri_schemes(cfg)
    check_output(cfg.output)
