"""Heads put on top of encoders: projections into CLIP's space and aesthetic heads."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PROJECTIONS = ("linear", "mlp")


class ProjectionHead(nn.Module):
    """P: encoder features (N, D_in) → CLIP space (N, D_clip), linear or a 2-layer MLP with GELU."""

    def __init__(self, in_dim: int, out_dim: int, kind: Literal["linear", "mlp"] = "linear") -> None:
        super().__init__()
        if kind not in PROJECTIONS:
            raise ValueError(f"projection {kind!r}: choose one of {list(PROJECTIONS)}")
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project pooled features."""
        return self.net(features)


class EncoderWithProjection(nn.Module):
    """E + P: a timm encoder (pooled features) followed by a projection head."""

    def __init__(self, encoder: nn.Module, projection: ProjectionHead) -> None:
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Project the encoder's pooled features of a normalised image batch."""
        return self.projection(self.encoder(images))


class AestheticHead(nn.Module):
    """H: pooled features → a distribution over K score bins (softmax) or one scalar score.

    For distributions the predicted score is Σ_k s_k p_k with bin scores s_k (AVA: 1..10).
    """

    def __init__(self, in_dim: int, kind: Literal["distribution", "scalar"], bins: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in ("distribution", "scalar"):
            raise ValueError(f"head kind {kind!r}: choose 'distribution' or 'scalar'")
        self.kind = kind
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, bins if kind == "distribution" else 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K) for a distribution head, scores (N,) for a scalar head."""
        out = self.net(features)
        return out.softmax(dim=-1) if self.kind == "distribution" else out.squeeze(-1)


class EncoderWithHead(nn.Module):
    """E + H: an (aligned) encoder followed by an aesthetic head."""

    def __init__(self, encoder: nn.Module, head: AestheticHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Head outputs for a normalised image batch."""
        return self.head(self.encoder(images))
