"""Loading the scoring models that teacher (and later distill) write to ``output/model``.

A model folder holds ``model.safetensors`` (encoder + aesthetic head) and ``model.json`` (encoder name,
head spec, preprocessing). Loading never executes pickled code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from cskd_ray import storage
from cskd_ray.data.transforms import PreprocessSpec
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.models.registry import WeightsUnavailableError, create_encoder, fetch_checkpoint, load_weights_into

MODEL_JSON, WEIGHTS = "model.json", "model.safetensors"


@dataclass
class ScoringModel:
    """A loaded scoring model: ``model(x)`` gives probabilities (N, K) or normalised scores (N,)."""

    model: nn.Module
    preprocess: PreprocessSpec
    head: dict
    model_id: str
    description: dict

    def to_score(self, output: torch.Tensor) -> torch.Tensor:
        """Scores on the dataset's scale: Σ_k k·p_k for distributions, lo + ŝ (hi − lo) for scalars."""
        if self.head["kind"] == "distribution":
            bins = torch.arange(1, self.head["bins"] + 1, device=output.device, dtype=output.dtype)
            return (output * bins).sum(-1)
        return self.head["low"] + output * (self.head["high"] - self.head["low"])


def describe_scoring_model(model_dir: str) -> dict:
    """Read ``model.json``; raise :class:`WeightsUnavailableError` naming the folder when it is not a model."""
    uri = storage.join(model_dir, MODEL_JSON)
    if not storage.exists(uri):
        raise WeightsUnavailableError(f"{model_dir}: not a model folder (no {MODEL_JSON}); pass teacher's output/model")
    description = json.loads(storage.read_text(uri))
    if "head" not in description:
        raise WeightsUnavailableError(f"{model_dir}: a {description.get('stage')} model has no aesthetic head")
    return description


def scoring_model_id(model_dir: str, description: dict) -> str:
    """``<stage>:<encoder>:<first 16 hex of the weights' sha256>``: names the model in output rows."""
    digest = hashlib.sha256(storage.read_bytes(storage.join(model_dir, WEIGHTS))).hexdigest()[:16]
    return f"{description['stage']}:{description['encoder']['name']}:{digest}"


def load_scoring_model(model_dir: str) -> ScoringModel:
    """Rebuild encoder + head from a model folder and load its weights (eval mode)."""
    description = describe_scoring_model(model_dir)
    head = description["head"]
    encoder = create_encoder(description["encoder"]["name"], False)
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, head["kind"], head["bins"]))
    path = fetch_checkpoint(storage.join(model_dir, WEIGHTS))
    load_weights_into(model, path, description["encoder"]["name"])
    spec = description["preprocess"]
    preprocess = PreprocessSpec.from_dict(spec)
    return ScoringModel(model.eval().requires_grad_(False), preprocess, head,
                        scoring_model_id(model_dir, description), description)
