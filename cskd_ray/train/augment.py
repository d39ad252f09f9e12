"""Batch augmentations for the consistency term, on the training device (no per-image Python work).

Both take a ``(N, 3, S, S)`` float batch in [0, 1] and return a new one of the same shape:

* ``weak``: a random horizontal flip (what the teacher sees);
* ``strong``: flip, a random resized crop (area fraction in [``crop_scale``, 1], aspect ratio in
  [3/4, 4/3], resized back to S), brightness / contrast / saturation jitter by factors in
  [1 − ``jitter``, 1 + ``jitter``], and Gaussian noise of standard deviation ``noise`` (FixMatch-style
  strong views; what the student sees).

The random draws come from ``rng``: a ``torch.Generator`` (or None: torch's global one) for the whole batch,
or a :class:`RowRandom`, which draws each row's values from that row's own generator, so a row is augmented
the same way whatever batch or DDP worker it lands in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F  # noqa: N812


class RowRandom:
    """Per-row random draws: row i's values come from a generator seeded with ``keys[i]`` and nothing else.

    The image transforms stay batched; only the few numbers per row (and the noise map) are drawn row by row.
    """

    def __init__(self, keys: Iterable[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(key)) for key in keys]

    def rand(self) -> torch.Tensor:
        """One uniform draw in [0, 1) per row, shape (N,)."""
        if not self.generators:
            return torch.zeros(0)
        return torch.stack([torch.rand((), generator=g) for g in self.generators])

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A standard normal tensor of ``shape`` per row, shape (N, *shape)."""
        if not self.generators:
            return torch.zeros((0, *shape))
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])


Rng = torch.Generator | RowRandom | None


def _rand(n: int, rng: Rng) -> torch.Tensor:
    return rng.rand() if isinstance(rng, RowRandom) else torch.rand(n, generator=rng)


def _randn(shape: tuple[int, ...], rng: Rng) -> torch.Tensor:
    return rng.randn(tuple(shape[1:])) if isinstance(rng, RowRandom) else torch.randn(shape, generator=rng)


def weak(images: torch.Tensor, generator: Rng = None) -> torch.Tensor:
    """Flip each image horizontally with probability ½."""
    flip = _rand(images.shape[0], generator).to(images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _crop_boxes(n: int, scale_min: float, generator: Rng) -> torch.Tensor:
    """Affine matrices (N, 2, 3) mapping the output grid onto random crops of the input ([-1, 1] coords)."""
    area = scale_min + (1.0 - scale_min) * _rand(n, generator)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * _rand(n, generator)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1.0 - width) * (2 * _rand(n, generator) - 1)
    cy = (1.0 - height) * (2 * _rand(n, generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    return theta


def strong(images: torch.Tensor, crop_scale: float = 0.5, jitter: float = 0.4, noise: float = 0.03,
           generator: Rng = None) -> torch.Tensor:
    """Flip, random resized crop, colour jitter and noise (see the module docstring)."""
    n = images.shape[0]
    out = weak(images, generator)
    theta = _crop_boxes(n, crop_scale, generator).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def factor() -> torch.Tensor:
        values = 1.0 + jitter * (2 * _rand(n, generator) - 1)
        return values.to(images.device, images.dtype).view(-1, 1, 1, 1)

    out = out * factor()  # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor() + mean  # contrast
    gray = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
    out = (out - gray) * factor() + gray  # saturation
    if noise:
        out = out + noise * _randn(tuple(out.shape), generator).to(images.device, images.dtype)
    return out.clamp(0.0, 1.0)
