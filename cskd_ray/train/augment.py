"""Batch augmentations for the consistency term, on the training device (no per-image Python work).

Both take a ``(N, 3, S, S)`` float batch in [0, 1] and return a new one of the same shape:

* ``weak``: a random horizontal flip (what the teacher sees);
* ``strong``: flip, a random resized crop (area fraction in [``crop_scale``, 1], aspect ratio in
  [3/4, 4/3], resized back to S), brightness / contrast / saturation jitter by factors in
  [1 − ``jitter``, 1 + ``jitter``], and Gaussian noise of standard deviation ``noise`` (FixMatch-style
  strong views; what the student sees).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812


def weak(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability ½."""
    flip = torch.rand(images.shape[0], generator=generator, device="cpu").to(images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _crop_boxes(n: int, scale_min: float, generator: torch.Generator | None) -> torch.Tensor:
    """Affine matrices (N, 2, 3) mapping the output grid onto random crops of the input ([-1, 1] coords)."""
    area = scale_min + (1.0 - scale_min) * torch.rand(n, generator=generator)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=generator)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1.0 - width) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1.0 - height) * (2 * torch.rand(n, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    return theta


def strong(images: torch.Tensor, crop_scale: float = 0.5, jitter: float = 0.4, noise: float = 0.03,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip, random resized crop, colour jitter and noise (see the module docstring)."""
    n = images.shape[0]
    out = weak(images, generator)
    theta = _crop_boxes(n, crop_scale, generator).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def factor() -> torch.Tensor:
        values = 1.0 + jitter * (2 * torch.rand(n, generator=generator) - 1)
        return values.to(images.device, images.dtype).view(-1, 1, 1, 1)

    out = out * factor()  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor() + mean  # contrast
    gray = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
    out = (out - gray) * factor() + gray  # saturation
    if noise:
        out = out + noise * torch.randn(out.shape, generator=generator).to(images.device, images.dtype)
    return out.clamp(0.0, 1.0)
