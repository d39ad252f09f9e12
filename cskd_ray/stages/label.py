"""Phase 2b, label: the teacher scores the unlabeled images with Ray Data into a pseudo-label table.

The pass (:func:`score_missing`) is also bulk scoring's (:mod:`cskd_ray.stages.score`) and evaluation's.

Output: a folder of Parquet shards with one row per input URI: ``uri``, ``sha256``, ``score`` (on the
dataset's scale, Σ_k k·p_k for distribution heads), ``distribution`` (list<float32>, null for scalar
heads), ``model`` (the model id) and ``error`` (null when scored). A rerun scores only what is missing;
the same content under several URIs is scored once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from pydantic import Field

from cskd_ray._version import __version__
from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.layout import LayoutConfig, check_layout, check_parts_config, resolve_layout
from cskd_ray.io.part_pass import CARRIED, run_parts
from cskd_ray.io.parts import plan_parts
from cskd_ray.io.preflight import check_paths, check_sources
from cskd_ray.io.row_pipeline import PipelineOptions, ShardWriter, process_pending
from cskd_ray.io.sources import expand_sources
from cskd_ray.io.transforms import PreprocessSpec


class LabelConfig(LayoutConfig):
    """Phase 2b: the teacher scores the unlabeled images → pseudo-label table (Parquet)."""

    model: str = Field(description="Model folder written by teacher (or distill): output/model.")


logger = logging.getLogger(__name__)


class ScoreActor:
    """Ray Data actor: loads a scoring model (PyTorch folder or export) once and scores batches of uint8 images."""

    def __init__(self, model_dir: str, device: str, precision: str, torch_threads: int, actors: int = 1) -> None:
        import torch

        from cskd_ray.models.precision import set_cpu_threads
        from cskd_ray.models.saved import load_scoring_model

        if device == "cpu":
            set_cpu_threads(torch_threads, actors)
        self.device = torch.device(device)
        self.scorer = load_scoring_model(model_dir).to(self.device)
        self.precision = precision

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Score the rows to compute; return the label schema's columns plus ``deferred``."""
        from cskd_ray.io.transforms import normalize_batch

        errors = [str(e) or None for e in batch["error"]]
        deferred = np.asarray(batch["deferred"], dtype=bool)
        ok = np.array([e is None for e in errors], dtype=bool) & ~deferred
        scores, dists = [None] * len(errors), [None] * len(errors)
        if ok.any():
            x = normalize_batch(batch["pixels"][ok], self.scorer.preprocess, self.device)
            ok_scores, ok_dists = self.scorer.predict(x, self.precision)
            ok_scores = ok_scores.cpu().numpy().tolist()
            ok_dists = ok_dists.cpu().numpy().tolist() if ok_dists is not None else None
            for j, i in enumerate(np.flatnonzero(ok)):
                scores[i] = ok_scores[j]
                dists[i] = ok_dists[j] if ok_dists is not None else None
        out = pa.table({"uri": pa.array([str(u) for u in batch["uri"]], pa.string()),
                        "sha256": pa.array([str(d) or None for d in batch["sha256"]], pa.string()),
                        "score": pa.array(scores, pa.float64()),
                        "distribution": pa.array(dists, pa.list_(pa.float32())),
                        "model": pa.array([self.scorer.model_id] * len(errors), pa.string()),
                        "error": pa.array(errors, pa.string()), "deferred": pa.array(deferred)})
        for name in CARRIED:  # the parts layout's row keys (cskd_ray.io.part_pass)
            if name in batch:
                out = out.append_column(name, pa.array(np.asarray(batch[name], dtype=np.int32)))
        return out


@dataclass
class LabelResult:
    """What a label run did."""

    output: str
    inputs: int
    already_done: int
    new_rows: int
    reused: int
    errors: int
    seconds: float
    model: str

    @property
    def images_per_s(self) -> float:
        """New rows per second."""
        return self.new_rows / self.seconds if self.seconds else 0.0


def score_missing(cfg: LabelConfig, stage: str, progress: Callable[[str], None] | None = None,
                  summarize: Callable[[pa.Table], dict] | None = None) -> LabelResult:
    """Score the inputs not yet in ``cfg.output`` with the model at ``cfg.model``. Ray must be initialised.

    The pass shared by ``label`` and ``score``: one row per input URI, a rerun scores only what is
    missing, and the same content under several URIs is scored once. ``stage`` names the progress lines.
    ``summarize`` (parts layout) summarises each committed part into its marker.
    """
    from cskd_ray.models.hub import is_hub_uri, pin_revision
    from cskd_ray.models.saved import describe_scoring_model, scoring_model_id

    progress = progress or logger.info
    start = time.perf_counter()
    if is_hub_uri(cfg.model):  # one commit for every actor, also when run() is called without check()
        cfg.model = pin_revision(cfg.model)
    description = describe_scoring_model(cfg.model)  # fails fast before any image is read
    preprocess = PreprocessSpec.from_dict(description["preprocess"])
    model_id = scoring_model_id(cfg.model, description)
    table = ResultTable(cfg.output, LABEL_SCHEMA)
    layout = resolve_layout(cfg)
    meta = {"model": model_id, "weights": model_id, "model_key": model_id, "head": description["head"],
            "preprocess": preprocess.to_dict(), "cskd_ray_version": __version__, "layout": layout}
    check_layout(table, layout)
    table.ensure_meta(meta)
    actor_kwargs = {"model_dir": cfg.model, "precision": cfg.precision, "torch_threads": cfg.torch_threads,
                    "actors": cfg.concurrency}
    if layout == "parts":
        plan = plan_parts(cfg.input, cfg.output, cfg.part_rows, cfg.max_images, cfg.id_column, cfg.columns,
                          progress=progress)
        done = run_parts(plan, cfg.output, LABEL_SCHEMA, preprocess, ScoreActor, actor_kwargs,
                         PipelineOptions.from_config(cfg), stage, progress, summarize, cfg.content_shards)
        return LabelResult(cfg.output, done.rows, done.rows_done_before, done.new_rows, done.deduplicated,
                           done.errors, time.perf_counter() - start, model_id)
    uris = expand_sources(cfg.input, cfg.max_images, cfg.seed)
    done = table.read(["uri", "sha256"])
    done_uris = set(done.column("uri").to_pylist())
    pending = [u for u in uris if u not in done_uris]
    progress(f"{stage}: {len(uris)} inputs, {len(uris) - len(pending)} already scored, {len(pending)} to do")
    writer = ShardWriter(table, stage, cfg.shard_rows, len(pending), progress)
    known = sorted({d for d in done.column("sha256").to_pylist() if d})
    reused = process_pending(pending, known, preprocess, ScoreActor, actor_kwargs,
                             PipelineOptions.from_config(cfg), writer)
    return LabelResult(cfg.output, len(uris), len(uris) - len(pending), writer.rows, reused, writer.errors,
                       time.perf_counter() - start, model_id)


def run(cfg: LabelConfig, progress: Callable[[str], None] | None = None) -> LabelResult:
    """Phase 2b: pseudo-label the inputs not yet in ``cfg.output``. Ray must be initialised."""
    return score_missing(cfg, "label", progress)


def result_dict(result: LabelResult) -> dict:
    """JSON-ready summary."""
    return {**asdict(result), "images_per_s": round(result.images_per_s, 2)}


def check(cfg: LabelConfig) -> None:
    """Before Ray starts: paths, that every source exists, and that ``model`` is a model folder that loads."""
    check_paths(cfg)
    check_sources(cfg)
    check_parts_config(cfg)
    if not storage.exists(storage.join(cfg.model, "model.json")):  # cheap, before importing torch
        raise ConfigError(f"model {cfg.model}: not a model folder (no model.json); run `teacher` first and "
                          "pass its output/model")
    from cskd_ray.models.saved import describe_scoring_model

    describe_scoring_model(cfg.model)


def summary(result: LabelResult) -> str:
    """The line ``cskd-ray label`` prints at the end."""
    return (f"label: {result.inputs} images, {result.already_done} already labeled, {result.new_rows} new rows "
            f"({result.reused} copied by content), {result.errors} errors, {result.images_per_s:.1f} img/s, "
            f"{result.seconds:.1f} s; pseudo-labels at {result.output} (model {result.model})")
