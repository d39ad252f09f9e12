"""The two output layouts of an image pass (features, label, score), their config keys and checks.

- **table**: shards keyed by URI, written by the driver as rows stream in (:mod:`cskd_ray.io.row_pipeline`).
- **parts**: the collection is planned once into parts, each computed, written and committed off the driver
  (:mod:`cskd_ray.io.parts`, :mod:`cskd_ray.io.part_pass`); WebDataset tars, Parquet with image bytes, user ids
  and pass-through columns need it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cskd_ray.config import ConfigError
from cskd_ray.io.feature_cache import ResultTable
from cskd_ray.io.parts import check_sources_for_parts, is_container_source
from cskd_ray.io.row_pipeline import ImagePassConfig
from cskd_ray.io.sources import SourceError


class LayoutConfig(ImagePassConfig):
    """The image-pass keys plus the choice of layout and the parts layout's own keys."""

    layout: Literal["auto", "table", "parts"] = Field(
        "auto", description="table: shards keyed by URI, content deduplicated across the whole output. parts: the "
        "collection is planned into parts, each computed, written and committed off the driver (WebDataset tars, "
        "Parquet with image bytes, id and pass-through columns). auto: parts when an input is a tar or Parquet "
        "with images or id_column/columns are set, else table."
    )
    part_rows: int = Field(10_000, ge=1, description="parts layout: inputs per part (the unit of work and resume).")
    id_column: str | None = Field(
        None, description="parts layout: the inputs' column (of a manifest or Parquet file; 'key' for tars) copied "
        "to every output row as 'id'."
    )
    columns: list[str] = Field(
        default_factory=list, description="parts layout: more input columns copied to every output row (tars always "
        "keep key, json and txt)."
    )
    content_shards: int | None = Field(
        None, ge=0, description="parts layout: actors of the content index that computes each content once across "
        "parts and runs (default: one per 20 million inputs; 0: once per part only)."
    )


def resolve_layout(cfg: Any) -> str:
    """``table`` or ``parts`` for a :class:`LayoutConfig`.

    ``auto`` is parts when an input needs it (a container, ids or pass-through columns).
    """
    if cfg.layout != "auto":
        if cfg.layout == "table" and (cfg.id_column or cfg.columns or any(is_container_source(s) for s in cfg.input)):
            raise ConfigError("layout: table cannot read WebDataset tars or Parquet with image bytes, nor keep "
                              "id_column/columns; use layout: parts (or auto)")
        return cfg.layout
    parts = bool(cfg.id_column or cfg.columns) or any(is_container_source(s) for s in cfg.input)
    return "parts" if parts else "table"


def check_parts_config(cfg: Any) -> None:
    """The parts layout's config checks, before Ray starts (weights, reserved column names).

    Raises:
        ConfigError: Names the key and why.
    """
    if resolve_layout(cfg) == "parts":
        try:
            check_sources_for_parts(cfg.input, cfg.columns)
        except SourceError as exc:
            raise ConfigError(str(exc)) from None


def check_layout(table: ResultTable, layout: str) -> None:
    """Refuse to add one layout's rows to an output written in the other (readers would mix them)."""
    meta = table.read_meta()
    found = meta.get("layout", "table") if meta else layout
    if found != layout:
        raise ConfigError(f"output {table.uri} is written in the {found} layout, not {layout}; choose another "
                          f"output or layout: {found}")
