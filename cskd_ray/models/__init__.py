"""Models created by name: CLIP image towers (open_clip) and encoders (timm), with preprocessing."""

from cskd_ray.models.registry import (
    LoadedModel,
    UnknownModelError,
    WeightsUnavailableError,
    create_clip,
    create_encoder,
    describe_clip,
    list_clip_models,
    list_clip_pretrained,
    list_encoders,
)

__all__ = [
    "LoadedModel",
    "UnknownModelError",
    "WeightsUnavailableError",
    "create_clip",
    "create_encoder",
    "describe_clip",
    "list_clip_models",
    "list_clip_pretrained",
    "list_encoders",
]
