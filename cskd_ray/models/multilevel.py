"""Frozen multi-level features of several object classifiers: the encoder of Hou et al.'s combined teacher.

"Distilling Knowledge from Object Classification to Aesthetics Assessment" (arXiv 2206.00809) describes an
image by several frozen pretrained classifiers at once: from each classifier b, the feature maps of several
levels (stages) l are globally average-pooled and everything is concatenated,

    f(x) = concat_{b, l} GAP(F_{b,l}(x_b)),   GAP(F) = (1/(H·W)) Σ_{i,j} F[:, :, i, j],

so ``dim`` = Σ_{b,l} C_{b,l}. An MLP head trained on the aesthetic labels on top of f (the teacher stage with
``classifiers``) is the combined teacher; its hidden layer is the "aesthetic feature" a student distils.

The maps come from timm's ``features_only=True`` models with ``out_indices`` = the levels (negative levels count
from the deepest). The extractor takes one batch normalised with its own :class:`PreprocessSpec` (the first
classifier's mean and std, at ``image_size``) and hands each classifier the same pixels re-normalised with that
classifier's mean and std (and resized to its own input size when it is a patch-based model with a fixed grid).
It is frozen: every parameter has ``requires_grad=False``, ``train()`` leaves it in eval mode (BatchNorm
statistics never move) and ``forward`` runs under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from cskd_ray.io.transforms import PreprocessSpec
from cskd_ray.models.registry import (
    RANDOM_WEIGHTS,
    LoadedModel,
    WeightsUnavailableError,
    fetch_checkpoint,
    file_digest,
    list_encoders,
    load_state_dict,
    unknown_model,
)

KIND = "classifiers"
"""``model.json``'s ``encoder.kind`` for this extractor (:func:`cskd_ray.models.saved.load_scoring_model`)."""


@dataclass(frozen=True)
class Backbone:
    """One frozen classifier: a timm name, its weights and the feature levels taken from it.

    Attributes:
        name: A timm model name (``resnet50.a1_in1k``, the tiny ``test_resnet``).
        pretrained: False (random), True (timm's weights) or a checkpoint path / ``s3://`` URI of the classifier.
        levels: timm ``out_indices``: feature levels, 0 the shallowest, −1 the deepest.
    """

    name: str
    pretrained: bool | str = False
    levels: tuple[int, ...] = (-3, -2, -1)


class MultiLevelFeatures(nn.Module):
    """Frozen ``(N, 3, S, S)`` normalised images → ``(N, Σ C_{b,l})`` pooled, concatenated level features."""

    def __init__(self, backbones: list[nn.Module], specs: list[PreprocessSpec], preprocess: PreprocessSpec,
                 fixed_sizes: list[int | None]) -> None:
        """``backbones``: timm ``features_only`` models; ``specs``: their preprocessing; ``preprocess``: the input's."""
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.fixed_sizes = list(fixed_sizes)
        self.widths = [list(b.feature_info.channels()) for b in backbones]
        self.num_features = sum(sum(w) for w in self.widths)
        mean_in, std_in = torch.tensor(preprocess.mean), torch.tensor(preprocess.std)
        for index, spec in enumerate(specs):  # x_b = (x·std_in + mean_in − mean_b) / std_b = x·scale + shift
            mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
            self.register_buffer(f"scale{index}", (std_in / std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"shift{index}", ((mean_in - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MultiLevelFeatures:
        """Always eval mode: the classifiers are frozen, their BatchNorm statistics included."""
        return super().train(False)

    @staticmethod
    def pool(feature: torch.Tensor, width: int) -> torch.Tensor:
        """GAP of one level: NCHW or NHWC maps → mean over H, W; ``(N, T, C)`` tokens → mean over T."""
        if feature.ndim == 3:
            return feature.mean(dim=1)
        if feature.shape[1] != width and feature.shape[-1] == width:  # NHWC (Swin-like feature getters)
            return feature.mean(dim=(1, 2))
        return feature.mean(dim=(2, 3))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """concat_{b,l} GAP(F_{b,l}(x_b)) in float32, where x_b is ``images`` re-normalised for classifier b."""
        pooled = []
        for index, (backbone, widths, size) in enumerate(zip(self.backbones, self.widths, self.fixed_sizes,
                                                              strict=True)):
            x = images * getattr(self, f"scale{index}") + getattr(self, f"shift{index}")
            if size is not None and x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            features = backbone(x)
            pooled += [self.pool(f, w).float() for f, w in zip(features, widths, strict=True)]
        return torch.cat(pooled, dim=1)


def resolve_levels(name: str, levels: tuple[int, ...]) -> tuple[int, ...]:
    """Check ``levels`` against the number of feature levels of timm model ``name`` (built on the meta device).

    Raises:
        UnknownModelError: ``name`` is not a timm model.
        ValueError: A level is out of range; the message gives the valid range.
    """
    import timm

    if not timm.is_model(name):
        raise unknown_model("timm encoder", name, list_encoders())
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-1,))
    count = len(probe.feature_info.info)
    bad = [level for level in levels if not -count <= level < count]
    if bad or not levels:
        raise ValueError(f"levels {list(levels)}: {name} has {count} feature levels, 0..{count - 1} "
                         f"(or -{count}..-1 from the deepest)")
    return tuple(levels)


def _build(backbone: Backbone) -> tuple[nn.Module, str]:
    """A timm ``features_only`` model with its weights, and a stable identifier of the weights."""
    import timm

    levels = resolve_levels(backbone.name, backbone.levels)
    kwargs: dict = {"features_only": True, "out_indices": levels}
    pretrained = backbone.pretrained
    if isinstance(pretrained, str) and pretrained.lower() not in RANDOM_WEIGHTS:
        path = fetch_checkpoint(pretrained)  # loaded without pickled code, then timm adapts it to features_only
        overlay = {"state_dict": load_state_dict(path)}
        return timm.create_model(backbone.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs), \
            f"sha256:{file_digest(path)}"
    try:
        model = timm.create_model(backbone.name, pretrained=pretrained is True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise WeightsUnavailableError(f"cannot fetch timm weights for {backbone.name} ({type(exc).__name__}); "
                                      "pass a checkpoint path instead") from exc
    return model, f"timm:{backbone.name}" if pretrained is True else "random:timm-init"


def _spec(model: nn.Module, image_size: int | None = None) -> PreprocessSpec:
    import timm

    data_cfg = timm.data.resolve_model_data_config(model)
    return PreprocessSpec(image_size=int(image_size or data_cfg["input_size"][-1]),
                          mean=tuple(float(m) for m in data_cfg["mean"]),
                          std=tuple(float(s) for s in data_cfg["std"]),
                          interpolation=str(data_cfg.get("interpolation", "bicubic")))


def _fixed_size(model: nn.Module, spec: PreprocessSpec) -> int | None:
    """The input side of a patch-based model whose grid is fixed (ViT-like); None when any size goes."""
    for module in model.modules():
        embed = getattr(module, "patch_embed", None)
        if embed is not None and not getattr(module, "dynamic_img_size", False):
            return spec.image_size
    return None


def multilevel_name(backbones: list[Backbone]) -> str:
    """``classifiers:<name>+<name>...``: how the extractor is named in model ids and model cards."""
    return f"{KIND}:" + "+".join(b.name for b in backbones)


def create_multilevel_encoder(backbones: list[Backbone], image_size: int | None = None) -> LoadedModel:
    """The frozen multi-level extractor over ``backbones`` with its preprocessing.

    Args:
        backbones: The classifiers, in order (the output concatenates them in this order, levels in order).
        image_size: Input side; None: the first classifier's own (timm's pretrained_cfg). Mean and std are
            always the first classifier's; the others get re-normalised inputs.

    Raises:
        UnknownModelError: A name is not a timm model (the message lists close matches).
        ValueError: Levels out of range for a classifier.
        WeightsUnavailableError: Weights cannot be fetched or do not fit.
    """
    if not backbones:
        raise ValueError("classifiers: give at least one backbone")
    built = [_build(b) for b in backbones]
    models = [model for model, _ in built]
    own = [_spec(model) for model in models]
    preprocess = _spec(models[0], image_size)
    extractor = MultiLevelFeatures(models, own, preprocess, [_fixed_size(m, s) for m, s in zip(models, own,
                                                                                              strict=True)])
    weights = ",".join(w for _, w in built)
    return LoadedModel(extractor, preprocess, multilevel_name(backbones), weights, extractor.num_features)


def describe_multilevel(backbones: list[Backbone]) -> list[list[int]]:
    """The pooled widths per classifier and level, without building weights (meta device); fails fast.

    Raises:
        UnknownModelError, ValueError: As :func:`create_multilevel_encoder`.
    """
    import timm

    widths = []
    for backbone in backbones:
        levels = resolve_levels(backbone.name, backbone.levels)
        with torch.device("meta"):
            model = timm.create_model(backbone.name, pretrained=False, features_only=True, out_indices=levels)
        widths.append(list(model.feature_info.channels()))
    return widths


def backbones_from(description: dict) -> list[Backbone]:
    """The backbones of a ``classifiers`` config or of ``model.json``'s ``encoder`` entry (plain dicts)."""
    default = tuple(description.get("levels") or Backbone.levels)
    return [Backbone(b["name"], b.get("pretrained") or False, tuple(b.get("levels") or default))
            for b in description["backbones"]]

