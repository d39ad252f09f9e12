"""``cskd-ray diagnose``: attention statistics of a ViT encoder before and after alignment (feature collapse).

For every transformer block and head, over the patch tokens only (class/register tokens dropped, rows
renormalised to sum to 1):

* mean attention distance = Σ_j A_ij · ‖p_i − p_j‖ in pixels, averaged over queries i and images;
* attention entropy = −Σ_j A_ij log A_ij, averaged over queries and images.

Attention is recomputed from each block's own ``qkv`` projection (A = softmax(q k^T / √d)) through a
forward hook, so it does not depend on timm's fused attention kernel.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.decode import decode_image
from cskd_ray.io.sources import SourceConfig, expand_sources
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch, resize_crop
from cskd_ray.metrics import attention_distance, attention_entropy


def _blocks(encoder: nn.Module, name: str) -> list[nn.Module]:
    blocks = getattr(encoder, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
        raise ConfigError(f"diagnose needs a ViT encoder (timm VisionTransformer blocks with attn.qkv); {name} is "
                          f"a {type(encoder).__name__}")
    return list(blocks)


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor, name: str = "encoder") -> list[torch.Tensor]:
    """Attention probabilities (B, H, N, N) of every block for a normalised image batch."""
    maps: list[torch.Tensor] = []

    def capture(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        b, n, _ = x.shape
        qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        maps.append(((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1))

    handles = [block.attn.register_forward_pre_hook(capture) for block in _blocks(encoder, name)]
    try:
        encoder.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def diagnose_encoder(encoder: nn.Module, images: torch.Tensor, name: str = "encoder") -> dict[str, list]:
    """Per layer and head: mean attention distance (px) and entropy over the patch tokens."""
    _blocks(encoder, name)  # a clear error for encoders that are not ViTs
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    grid = tuple(encoder.patch_embed.grid_size)
    patch = int(encoder.patch_embed.patch_size[0])
    distance, entropy = [], []
    for attn in attention_maps(encoder, images, name):
        patches = attn[:, :, prefix:, prefix:]
        distance.append(attention_distance(patches, grid, patch).tolist())
        entropy.append(attention_entropy(patches).tolist())
    return {"distance_px": distance, "entropy": entropy}


def load_images(uris: list[str], spec: PreprocessSpec, max_images: int) -> torch.Tensor:
    """Decode up to ``max_images`` readable images from the inputs into a normalised batch."""
    pixels = []
    for uri in expand_sources([SourceConfig(uri=u) for u in uris], max_images=None):
        decoded = decode_image(storage.read_bytes(uri), draft_size=spec.image_size)
        if decoded.ok:
            pixels.append(resize_crop(decoded.image, spec))
        if len(pixels) == max_images:
            break
    if not pixels:
        raise ConfigError(f"--images {' '.join(uris)}: no decodable image found")
    return normalize_batch(np.stack(pixels), spec)


def plot(report: dict[str, Any]) -> bytes:
    """A PNG with mean distance and entropy per layer (averaged over heads), before vs after alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, title in ((axes[0], "distance_px", "mean attention distance (px)"),
                             (axes[1], "entropy", "attention entropy (nats)")):
        for label in ("before", "after"):
            values = np.asarray(report[label][key])
            axis.plot(range(1, len(values) + 1), values.mean(axis=1), marker="o", label=f"{label} alignment")
        axis.set_xlabel("layer")
        axis.set_title(title)
        axis.legend()
    fig.suptitle(f"{report['encoder']} on {report['images']} images")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class DiagnoseConfig:
    """What to diagnose: an aligned model folder (align's output/model) on some images (``cskd-ray diagnose``)."""

    model: str
    images: list[str]
    output: str
    max_images: int = 32


def run(cfg: DiagnoseConfig) -> dict[str, Any]:
    """Compare the aligned encoder at ``cfg.model`` with its starting point; write JSON and PNG to ``cfg.output``."""
    from cskd_ray.models.registry import create_encoder
    from cskd_ray.train.align import load_aligned

    model_dir, output = cfg.model, cfg.output
    aligned, spec, description = load_aligned(model_dir)
    encoder_cfg = description["encoder"]
    torch.manual_seed(description.get("config", {}).get("train", {}).get("seed", 0))
    before = create_encoder(encoder_cfg["name"], encoder_cfg.get("pretrained", False)).model
    images = load_images(cfg.images, spec, cfg.max_images)
    report = {"encoder": encoder_cfg["name"], "model": model_dir, "images": int(images.shape[0]),
              "before": diagnose_encoder(before, images, encoder_cfg["name"]),
              "after": diagnose_encoder(aligned.encoder, images, encoder_cfg["name"])}
    storage.write_text_once(storage.join(output, "diagnose.json"), json.dumps(report, indent=2), overwrite=True)
    storage.write_bytes_once(storage.join(output, "diagnose.png"), plot(report), overwrite=True)
    return report
