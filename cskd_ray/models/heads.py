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

    For distributions the predicted score is Σ_k s_k p_k with bin scores s_k (AVA: 1..10). With ``hidden`` the
    head is an MLP, H(f) = W_2 · Dropout(GELU(W_1 · Dropout(f))), whose hidden activation h = GELU(W_1 f) (in
    eval mode) is the "aesthetic feature" of Hou et al. (arXiv 2206.00809) that distill's ``hou_teacher`` term
    distils; without it, H(f) = W · Dropout(f) (and :meth:`embed` is f itself).
    """

    def __init__(self, in_dim: int, kind: Literal["distribution", "scalar"], bins: int = 10,
                 dropout: float = 0.0, hidden: int | None = None) -> None:
        super().__init__()
        if kind not in ("distribution", "scalar"):
            raise ValueError(f"head kind {kind!r}: choose 'distribution' or 'scalar'")
        self.kind = kind
        out = bins if kind == "distribution" else 1
        if hidden:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, out))
        else:  # the keys of a linear head (net.1.*) are those of every model folder written before MLP heads
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out))

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`embed`'s output (the hidden width of an MLP head, else the input width)."""
        return self.net[-1].in_features

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The input of the output layer: the hidden activation h of an MLP head (features of a linear one)."""
        return self.net[:-1](features)

    def predict(self, embedded: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K) or scores (N,) from :meth:`embed`'s output."""
        out = self.net[-1](embedded)
        return out.softmax(dim=-1) if self.kind == "distribution" else out.squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K) for a distribution head, scores (N,) for a scalar head."""
        return self.predict(self.embed(features))


class EncoderWithHead(nn.Module):
    """E + H: an (aligned) encoder followed by an aesthetic head."""

    def __init__(self, encoder: nn.Module, head: AestheticHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Head outputs for a normalised image batch."""
        return self.head(self.encoder(images))
