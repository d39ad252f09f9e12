"""``cskd-ray export``: a scoring model as ONNX or TorchScript, verified against PyTorch, with a sidecar.

The exported graph is :class:`cskd_ray.models.saved.ScoreOutputs`: input ``pixels``, a float32 NCHW batch
of any size, already normalised as ``export.json``'s ``preprocess`` says; outputs ``score`` (N,) on the
dataset's scale and, for distribution heads, ``distribution`` (N, K) (softmax probabilities over bins
1..K; score = Σ_k k·p_k). The sidecar ``export.json`` holds everything a server needs besides the file:

- ``preprocess``: ``image_size`` S, ``mean``, ``std``, ``interpolation``, ``resize_mode`` (``shortest``:
  resize the shorter side to S, then centre-crop S×S; ``squash``; ``longest``: fit and pad with black),
  and the formula x = (pixels / 255 − mean) / std on RGB channels, NCHW;
- ``head`` and ``score_scale`` (lo, hi), ``source_model_id`` and the exported file's ``sha256``
  (``score`` loads the file only when it matches);
- ``verification``: the max absolute difference between export and PyTorch on seeded sample inputs.

The export is written to a local temporary folder, verified, and only then copied to ``output``: a
failed verification leaves nothing a scorer could load.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cskd_ray._version import __version__
from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch
from cskd_ray.models.registry import file_digest
from cskd_ray.models.saved import (
    EXPORT_FILES,
    EXPORT_JSON,
    ScoreOutputs,
    ScoringModel,
    describe_scoring_model,
    load_exported_runner,
    load_scoring_model,
)

ONNX_OPSET = 17


class ExportVerificationError(RuntimeError):
    """The exported model's outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class ExportResult:
    """What an export wrote and how close it is to PyTorch."""

    output: str
    format: str
    file: str
    model_id: str
    max_abs_diff: float
    tolerance: float
    samples: int
    seconds: float


def sample_inputs(spec: PreprocessSpec, count: int, seed: int = 0) -> torch.Tensor:
    """Seeded random uint8 images normalised as the model expects: ``(count, 3, S, S)`` float32."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    return normalize_batch(pixels, spec).contiguous()


def _write(module: ScoreOutputs, fmt: str, example: torch.Tensor, path: Path, distribution: bool) -> None:
    outputs = ["score", "distribution"] if distribution else ["score"]
    if fmt == "onnx":
        # The TorchScript-based exporter: timm's models export with a dynamic batch axis in seconds.
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["pixels"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["pixels", *outputs]},
                          opset_version=ONNX_OPSET)
    else:
        torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(path))


def max_abs_difference(scorer: ScoringModel, path: Path, fmt: str, inputs: torch.Tensor) -> float:
    """Max |export − PyTorch| over the scores and (when present) the distributions of ``inputs``."""
    expected_scores, expected_dists = scorer.predict(inputs)
    got = load_exported_runner(path, fmt)(inputs)
    diff = (got[0].float() - expected_scores).abs().max().item()
    if expected_dists is not None:
        diff = max(diff, (got[1].float() - expected_dists).abs().max().item())
    return float(diff)


def export_model(model_dir: str, fmt: str, output: str, tolerance: float = 1e-4, samples: int = 8,
                 seed: int = 0) -> ExportResult:
    """Export the scoring model in ``model_dir`` to ``output`` (folder or s3:// prefix) and verify it.

    Raises:
        ConfigError: ``fmt`` is not a known format, ``tolerance`` is not positive, or the model is an export.
        ExportVerificationError: The export differs from PyTorch by more than ``tolerance``.
    """
    if fmt not in EXPORT_FILES:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(EXPORT_FILES)}")
    if not tolerance > 0 or samples < 1:
        raise ConfigError(f"--tolerance must be > 0 (got {tolerance}) and samples >= 1 (got {samples})")
    if "format" in describe_scoring_model(model_dir):
        raise ConfigError(f"--model {model_dir}: already an export; pass the PyTorch model folder it came from")
    start = time.perf_counter()
    scorer = load_scoring_model(model_dir)
    assert isinstance(scorer, ScoringModel)
    module = ScoreOutputs(scorer.model, scorer.head).eval()
    distribution = scorer.head["kind"] == "distribution"
    # Traced with a batch of 2 and verified with another size: the batch axis must really be dynamic.
    example, inputs = sample_inputs(scorer.preprocess, 2, seed), sample_inputs(scorer.preprocess, samples, seed + 1)
    with tempfile.TemporaryDirectory(prefix="cskd-export-") as tmp:
        path = Path(tmp) / EXPORT_FILES[fmt]
        with torch.no_grad():
            _write(module, fmt, example, path, distribution)
        diff = max_abs_difference(scorer, path, fmt, inputs)
        if not diff <= tolerance:
            raise ExportVerificationError(f"{fmt} export of {model_dir} differs from PyTorch by {diff:.3g} "
                                          f"(max abs) > tolerance {tolerance:g}; nothing written to {output}")
        sha256 = file_digest(path)
        sidecar = _sidecar(scorer, fmt, sha256, diff, tolerance, samples, seed)
        storage.write_bytes_once(storage.join(output, EXPORT_FILES[fmt]), path.read_bytes(), overwrite=True)
    storage.write_text_once(storage.join(output, EXPORT_JSON), json.dumps(sidecar, indent=2), overwrite=True)
    model_id = f"{scorer.model_id}/{fmt}:{sha256[:16]}"
    return ExportResult(output, fmt, storage.join(output, EXPORT_FILES[fmt]), model_id, diff, tolerance, samples,
                        time.perf_counter() - start)


def _sidecar(scorer: ScoringModel, fmt: str, sha256: str, diff: float, tolerance: float, samples: int,
             seed: int) -> dict:
    lo, hi = (1.0, float(scorer.head["bins"])) if scorer.head["kind"] == "distribution" else (
        float(scorer.head["low"]), float(scorer.head["high"]))
    spec = scorer.preprocess
    return {
        "format": fmt, "file": EXPORT_FILES[fmt], "sha256": sha256,
        "stage": scorer.description["stage"], "encoder": scorer.description["encoder"],
        "source_model_id": scorer.model_id, "head": scorer.head,
        "preprocess": spec.to_dict(),
        "input": {"name": "pixels", "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, spec.image_size,
                                                                                     spec.image_size],
                  "formula": "x = (pixels / 255 - mean) / std, RGB, after resize_mode to image_size"},
        "outputs": ({"score": "(batch,) sum_k k * p_k", "distribution": f"(batch, {scorer.head['bins']}) softmax"}
                    if scorer.head["kind"] == "distribution" else {"score": "(batch,) low + s * (high - low)"}),
        "score_scale": {"low": lo, "high": hi},
        "verification": {"samples": samples, "seed": seed, "max_abs_diff": diff, "tolerance": tolerance},
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "torch_version": torch.__version__, "cskd_ray_version": __version__,
    }


@dataclass
class ExportConfig:
    """What to export: a model folder, the format (``onnx`` or ``torchscript``), where, and the tolerance."""

    model: str
    format: str
    output: str
    tolerance: float = 1e-4


def run(cfg: ExportConfig) -> ExportResult:
    """Export, verify and write ``cfg.model`` (see :func:`export_model`)."""
    return export_model(cfg.model, cfg.format, cfg.output, cfg.tolerance)


def result_dict(result: ExportResult) -> dict:
    """JSON-ready summary."""
    return asdict(result)
