"""The one preprocessing path used by feature extraction, training and scoring.

Preprocessing is split where it is cheapest to move data: CPU tasks resize and crop decoded images to
``uint8`` arrays (:func:`resize_crop`, 3·S² bytes per image), and the model side normalises them to
float on its own device (:func:`normalize_batch`). A :class:`PreprocessSpec` describes both halves and
its :meth:`PreprocessSpec.key` is part of the feature-cache key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported lazily: decode tasks on CPU workers never need it
    import torch

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_MODES = ("shortest", "squash", "longest")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input.

    Attributes:
        image_size: Side of the square model input in pixels.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
        interpolation: Resampling filter: bicubic, bilinear, nearest or lanczos.
        resize_mode: ``shortest`` (resize the short side, then centre crop; CLIP/timm default),
            ``squash`` (resize both sides, aspect not kept) or ``longest`` (fit, then pad with black).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r}: choose one of {sorted(_RESAMPLE)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}: choose one of {list(RESIZE_MODES)}")
        if self.image_size < 8:
            raise ValueError(f"image_size {self.image_size} is too small (minimum 8)")

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        """Rebuild a spec from :meth:`to_dict` output (lists become tuples)."""
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    def to_dict(self) -> dict:
        """A JSON-ready description."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def key(self) -> str:
        """A short stable digest of the spec (part of the feature-cache key)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize and crop an RGB image to a ``(S, S, 3)`` uint8 array as ``spec`` says."""
    size, resample = spec.image_size, _RESAMPLE[spec.interpolation]
    width, height = img.size
    if spec.resize_mode == "squash":
        return np.asarray(img.resize((size, size), resample), dtype=np.uint8)
    if spec.resize_mode == "longest":
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img.resize(new, resample), ((size - new[0]) // 2, (size - new[1]) // 2))
        return np.asarray(canvas, dtype=np.uint8)
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = img.resize((new_w, new_h), resample, reducing_gap=3.0 if max(width, height) > 4 * size else None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize_batch(images: np.ndarray | torch.Tensor, spec: PreprocessSpec, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Turn a ``(N, S, S, 3)`` uint8 batch into a normalised ``(N, 3, S, S)`` float tensor on ``device``.

    x = (pixels / 255 − mean) / std, computed on the target device so only bytes cross the bus.
    """
    import torch

    dtype = dtype or torch.float32
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2).to(dtype) / 255.0  # a new tensor: the caller's input is never modified
    mean = torch.tensor(spec.mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
