"""Loading scoring models: the one place that knows the kinds of model folder.

Two kinds of folder score images:

- a **PyTorch** folder written by teacher / distill (``output/model``): ``model.safetensors`` (encoder +
  aesthetic head) and ``model.json`` (encoder name, head spec, preprocessing). The encoder is a timm model
  or, for Hou et al.'s combined teacher, frozen classifiers pooled at several levels (``encoder.kind:
  classifiers``, :mod:`cskd_ray.models.multilevel`); ``head.hidden`` gives an MLP head's hidden width.
  Loading never executes pickled code.
- an **export** folder written by ``cskd-ray export``: ``model.onnx`` or ``model.ts`` (TorchScript) and the
  sidecar ``export.json`` (format, file sha256, head, preprocessing, source model id). The file is only
  loaded when its sha256 matches the sidecar. TorchScript archives hold code that ``torch.jit.load``
  runs: load only exports you (or your pipeline) wrote.

A model may also be named ``hf-hub:org/name[@revision]``: a PyTorch folder published with ``cskd-ray push``,
read from the local Hugging Face cache (downloaded when missing; :mod:`cskd_ray.models.hub`).

Every loader returns an object with ``preprocess``, ``head``, ``model_id``, ``description`` and
``predict(x) -> (scores, distributions | None)``, so the scoring actors never ask which kind they hold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cskd_ray.io import storage
from cskd_ray.io.transforms import PreprocessSpec
from cskd_ray.models import multilevel
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.models.registry import (
    LoadedModel,
    WeightsUnavailableError,
    create_encoder,
    fetch_checkpoint,
    file_digest,
    load_weights_into,
)

MODEL_JSON, WEIGHTS, EXPORT_JSON = "model.json", "model.safetensors", "export.json"
EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}


def head_to_score(head: dict, output: torch.Tensor) -> torch.Tensor:
    """Scores on the dataset's scale: Σ_k k·p_k for distributions, lo + ŝ (hi − lo) for scalars."""
    if head["kind"] == "distribution":
        bins = torch.arange(1, head["bins"] + 1, device=output.device, dtype=output.dtype)
        return (output * bins).sum(-1)
    return head["low"] + output * (head["high"] - head["low"])


class ScoreOutputs(nn.Module):
    """Image batch in, ``(score, distribution)`` out (``score`` alone for scalar heads): what exports hold."""

    def __init__(self, model: nn.Module, head: dict) -> None:
        super().__init__()
        self.model, self.head = model, dict(head)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores (N,) and, for distribution heads, probabilities (N, K) of a normalised NCHW batch."""
        out = self.model(pixels)
        score = head_to_score(self.head, out)
        return (score, out) if self.head["kind"] == "distribution" else score


@dataclass
class ScoringModel:
    """A PyTorch scoring model: ``model(x)`` gives probabilities (N, K) or normalised scores (N,)."""

    model: nn.Module
    preprocess: PreprocessSpec
    head: dict
    model_id: str
    description: dict

    def to_score(self, output: torch.Tensor) -> torch.Tensor:
        """Scores on the dataset's scale (see :func:`head_to_score`)."""
        return head_to_score(self.head, output)

    def to(self, device: torch.device | str) -> ScoringModel:
        """Move the model to ``device``."""
        self.model = self.model.to(device)
        return self

    def predict(self, pixels: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (N,) and distributions (N, K) or None, in float32, of a normalised batch."""
        from cskd_ray.models.precision import autocast

        with torch.inference_mode(), autocast(pixels.device.type, precision):
            out = self.model(pixels).float()
        return self.to_score(out), (out if self.head["kind"] == "distribution" else None)


@dataclass
class ExportedScoringModel:
    """An exported (ONNX / TorchScript) scoring model; ``run`` maps a float32 NCHW batch to its outputs."""

    run: _Runner
    preprocess: PreprocessSpec
    head: dict
    model_id: str
    description: dict

    def to(self, device: torch.device | str) -> ExportedScoringModel:
        """Reload the runner for ``device`` (ONNX Runtime picks its execution provider from it)."""
        self.run = load_exported_runner(self.run.path, self.description["format"], torch.device(device))
        return self

    def predict(self, pixels: torch.Tensor, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (N,) and distributions (N, K) or None; exports always compute in float32."""
        outputs = self.run(pixels.float())
        return outputs[0].float(), (outputs[1].float() if len(outputs) > 1 else None)


class _Runner:
    """Calls an ONNX Runtime session or a TorchScript module with a torch batch; returns torch tensors."""

    def __init__(self, path: Path, fmt: str, device: torch.device) -> None:
        self.path, self.fmt, self.device = path, fmt, device
        if fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
            providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        else:
            self.module = torch.jit.load(str(path), map_location=device).eval()

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fmt == "onnx":
            feed = {"pixels": pixels.detach().contiguous().cpu().numpy()}
            return tuple(torch.from_numpy(o).to(pixels.device) for o in self.session.run(None, feed))
        with torch.inference_mode():
            out = self.module(pixels.contiguous())
        return out if isinstance(out, tuple) else (out,)


def load_exported_runner(path: Path, fmt: str, device: torch.device | None = None) -> _Runner:
    """A callable running the exported file at ``path`` (local) in format ``fmt`` on ``device``."""
    if fmt not in EXPORT_FILES:
        raise WeightsUnavailableError(f"{path}: export format {fmt!r}; valid formats: {', '.join(EXPORT_FILES)}")
    return _Runner(Path(path), fmt, device or torch.device("cpu"))


def local_model_dir(model_dir: str) -> str:
    """``model_dir`` itself, or for ``hf-hub:org/name[@revision]`` its snapshot folder in the Hugging Face cache.

    Raises:
        cskd_ray.models.hub.HubError: If a Hub model cannot be fetched (offline and not cached, no such repo).
    """
    if not model_dir.startswith("hf-hub:"):
        return model_dir
    from cskd_ray.models.hub import download_model

    return download_model(model_dir)


def describe_scoring_model(model_dir: str) -> dict:
    """Read ``model.json`` or ``export.json``; raise :class:`WeightsUnavailableError` when it is neither.

    An export's description has a ``format`` key (``onnx`` or ``torchscript``); a PyTorch folder's has none.
    """
    model_dir = local_model_dir(model_dir)
    uri = storage.join(model_dir, MODEL_JSON)
    export_uri = storage.join(model_dir, EXPORT_JSON)
    if not storage.exists(uri):
        if storage.exists(export_uri):
            description = json.loads(storage.read_text(export_uri))
            if description.get("format") not in EXPORT_FILES:
                raise WeightsUnavailableError(f"{export_uri}: format {description.get('format')!r}; valid "
                                              f"formats: {', '.join(EXPORT_FILES)}")
            return description
        raise WeightsUnavailableError(f"{model_dir}: not a model folder (no {MODEL_JSON}); pass teacher's output/model")
    description = json.loads(storage.read_text(uri))
    if "head" not in description:
        raise WeightsUnavailableError(f"{model_dir}: a {description.get('stage')} model has no aesthetic head")
    return description


def scoring_model_id(model_dir: str, description: dict) -> str:
    """Names the model in output rows.

    ``<stage>:<encoder>:<first 16 hex of the weights' sha256>`` for PyTorch folders, and
    ``<source id>/<format>:<first 16 hex of the exported file's sha256>`` for exports.
    """
    if "format" in description:
        return f"{description['source_model_id']}/{description['format']}:{description['sha256'][:16]}"
    digest = hashlib.sha256(storage.read_bytes(storage.join(local_model_dir(model_dir), WEIGHTS))).hexdigest()[:16]
    return f"{description['stage']}:{description['encoder']['name']}:{digest}"


def verified_export_file(model_dir: str, description: dict) -> Path:
    """A local copy of an export's model file, after checking its sha256 against ``export.json``."""
    path = fetch_checkpoint(storage.join(model_dir, description["file"]))
    if file_digest(path) != description["sha256"]:
        raise WeightsUnavailableError(f"{storage.join(model_dir, description['file'])}: sha256 does not match "
                                      f"{EXPORT_JSON}; refusing to load a file the export did not write")
    return path


def _load_export(model_dir: str, description: dict) -> ExportedScoringModel:
    runner = load_exported_runner(verified_export_file(model_dir, description), description["format"])
    return ExportedScoringModel(runner, PreprocessSpec.from_dict(description["preprocess"]), description["head"],
                                scoring_model_id(model_dir, description), description)


def build_encoder(encoder: dict) -> LoadedModel:
    """The encoder a ``model.json`` describes, with random weights (the folder's weights are loaded after).

    A timm encoder by ``name``, or (``kind: classifiers``) the frozen multi-level extractor of Hou et al.'s
    combined teacher (:mod:`cskd_ray.models.multilevel`).
    """
    if encoder.get("kind") == multilevel.KIND:
        backbones = [replace(b, pretrained=False) for b in multilevel.backbones_from(encoder)]
        return multilevel.create_multilevel_encoder(backbones, encoder.get("image_size"))
    return create_encoder(encoder["name"], False)


def load_scoring_model(model_dir: str) -> ScoringModel | ExportedScoringModel:
    """Load the scoring model in ``model_dir``, whichever kind it is (PyTorch in eval mode, or an export)."""
    model_dir = local_model_dir(model_dir)
    description = describe_scoring_model(model_dir)
    if "format" in description:
        return _load_export(model_dir, description)
    head = description["head"]
    encoder = build_encoder(description["encoder"])
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, head["kind"], head["bins"],
                                                         hidden=head.get("hidden")))
    path = fetch_checkpoint(storage.join(model_dir, WEIGHTS))
    load_weights_into(model, path, description["encoder"]["name"])
    preprocess = PreprocessSpec.from_dict(description["preprocess"])
    return ScoringModel(model.eval().requires_grad_(False), preprocess, head,
                        scoring_model_id(model_dir, description), description)
