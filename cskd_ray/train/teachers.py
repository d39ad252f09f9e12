"""Frozen teachers for distillation: the trained aesthetic teacher and extra feature teachers.

The aesthetic teacher feeds the consistency term; the extra teachers (multi-teacher, arXiv 2206.00809)
are CLIP image towers and timm object classifiers; the hidden-layer teacher (Hou et al.'s combined teacher,
arXiv 2206.00809: frozen classifiers + an MLP head trained on the labels) gives its hidden layer and its
prediction.

A frozen teacher is kept *outside* the task's module tree: its parameters are not in the optimiser, not in
DDP's gradient buckets and not in checkpoints (a ViT-L teacher would otherwise be copied into every
checkpoint). It is always in eval mode, its parameters have ``requires_grad=False`` and it runs under
``torch.no_grad()``, so no gradient can reach it. Each teacher sees the batch resized to its own input size
and normalised with its own mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cskd_ray.config import ConfigError
from cskd_ray.io.transforms import PreprocessSpec
from cskd_ray.train.config import ExtraTeacherConfig


class FrozenTeacher:
    """A frozen model fed ``(N, 3, S, S)`` images in [0, 1]; ``__call__`` returns float32 outputs."""

    def __init__(self, model: nn.Module, preprocess: PreprocessSpec, dim: int, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess, self.dim, self.name = preprocess, dim, name
        self._device: torch.device | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The teacher's parameters (for tests and for moving it)."""
        return list(self.model.parameters())

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            self.model.to(device)
            self._device = device

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the teacher's input size (bilinear, antialiased) and normalise; the model goes to eval mode."""
        self._to(images.device)
        self.model.eval()
        size = self.preprocess.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.preprocess.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the teacher's input size, normalise, forward in eval mode."""
        return self.model(self._inputs(images)).float()


class HiddenLayerTeacher(FrozenTeacher):
    """A frozen trained teacher whose head has a hidden layer (Hou et al.'s combined teacher, arXiv 2206.00809).

    ``__call__`` returns (h_T(x), prediction_T(x)): the head's hidden activation, the "aesthetic feature" of width
    ``dim``, and its output (probabilities (N, K) or normalised scores (N,)), both float32. ``head`` is the
    teacher's head spec (``model.json``), to map scalar outputs back to the dataset's scale.
    """

    def __init__(self, model: nn.Module, preprocess: PreprocessSpec, name: str, head: dict) -> None:
        super().__init__(model, preprocess, model.head.embed_dim, name)
        self.head = head

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(h_T(x), prediction_T(x)) of ``(N, 3, S, S)`` images in [0, 1]."""
        hidden = self.model.head.embed(self.model.encoder(self._inputs(images)))
        return hidden.float(), self.model.head.predict(hidden).float()


def build_extra_teacher(cfg: ExtraTeacherConfig) -> FrozenTeacher:
    """A CLIP image tower (``kind: clip``) or a timm model's pooled features (``kind: timm``), frozen."""
    from cskd_ray.models.registry import create_clip, create_encoder

    if cfg.kind == "clip":
        loaded = create_clip(cfg.name, cfg.pretrained if isinstance(cfg.pretrained, str) else None, seed=cfg.seed)
    else:
        loaded = create_encoder(cfg.name, cfg.pretrained if cfg.pretrained is not None else False)
    return FrozenTeacher(loaded.model, loaded.preprocess, loaded.dim, f"{cfg.kind}:{cfg.name}")


def describe_extra_teacher(cfg: ExtraTeacherConfig) -> int:
    """The teacher's output width, without loading weights (CLIP: meta device); fails fast on a bad name."""
    from cskd_ray.models.registry import create_encoder, describe_clip

    if cfg.kind == "clip":
        return describe_clip(cfg.name, cfg.pretrained if isinstance(cfg.pretrained, str) else None, seed=cfg.seed).dim
    return create_encoder(cfg.name, False).dim


def load_scoring_teacher(model_dir: str) -> tuple[FrozenTeacher, dict]:
    """The trained aesthetic teacher (a teacher stage's ``output/model``), frozen, and its head spec."""
    from cskd_ray.models.saved import load_scoring_model

    loaded = load_scoring_model(model_dir)
    return FrozenTeacher(loaded.model, loaded.preprocess, loaded.head["bins"], f"teacher:{loaded.model_id}"), \
        loaded.head


def load_hidden_layer_teacher(model_dir: str) -> HiddenLayerTeacher:
    """A teacher stage's ``output/model`` with a hidden-layer head (``hidden_dim``), frozen, for distill's Hou terms.

    Raises:
        ConfigError: The folder is an export (no hidden layer to read) or its head has no hidden layer.
    """
    from cskd_ray.models.saved import ScoringModel, load_scoring_model

    loaded = load_scoring_model(model_dir)
    if not isinstance(loaded, ScoringModel) or not loaded.head.get("hidden"):
        raise ConfigError(f"hou_teacher {model_dir}: its head has no hidden layer; train it with `teacher` and "
                          "hidden_dim (and classifiers for Hou et al.'s combined teacher)")
    return HiddenLayerTeacher(loaded.model, loaded.preprocess, f"hou:{loaded.model_id}", loaded.head)
