"""Attention diagnostics: the recomputed attention is the block's own, statistics are in range, files are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cskd_ray.app.cli import main
from cskd_ray.config import ConfigError
from cskd_ray.models import create_encoder
from cskd_ray.models.heads import EncoderWithProjection, ProjectionHead
from cskd_ray.stages.diagnose import attention_maps, diagnose_encoder


def test_recomputed_attention_reproduces_each_block_output() -> None:
    torch.manual_seed(0)
    encoder = create_encoder("test_vit").model.eval()
    images = torch.randn(2, 3, 160, 160)
    outputs = []
    handles = [b.attn.register_forward_hook(lambda m, i, o: outputs.append((i[0], o))) for b in encoder.blocks]
    maps = attention_maps(encoder, images)
    for handle in handles:
        handle.remove()
    assert len(maps) == len(encoder.blocks) and maps[0].shape == (2, 2, 101, 101)  # 100 patches + class token
    for block, attn, (x, out) in zip(encoder.blocks, maps, outputs, strict=True):
        module = block.attn
        b, n, c = x.shape
        v = module.qkv(x).reshape(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
        again = module.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


def test_statistics_are_in_range() -> None:
    encoder = create_encoder("test_vit").model
    report = diagnose_encoder(encoder, torch.randn(2, 3, 160, 160))
    max_distance = math.hypot(9 * 16, 9 * 16)
    for layer_d, layer_e in zip(report["distance_px"], report["entropy"], strict=True):
        assert len(layer_d) == len(layer_e) == 2  # heads
        assert all(0 <= d <= max_distance for d in layer_d)
        assert all(0 <= e <= math.log(100) + 1e-5 for e in layer_e)


def test_non_vit_encoder_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"diagnose needs a ViT encoder.*test_resnet"):
        diagnose_encoder(create_encoder("test_resnet").model, torch.randn(1, 3, 64, 64), "test_resnet")


def test_cli_writes_json_and_png_for_an_aligned_model(demo_data: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    encoder = create_encoder("test_vit")
    model = EncoderWithProjection(encoder.model, ProjectionHead(encoder.dim, 32))
    folder = tmp_path / "align" / "model"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "stage": "align", "clip_dim": 32, "preprocess": encoder.preprocess.to_dict(),
        "encoder": {"name": "test_vit", "pretrained": False, "projection": "linear"}}))
    status = main(["diagnose", "--model", str(folder), "--images", str(demo_data / "images"), "--max-images", "4"])
    assert status == 0 and "4 images" in capsys.readouterr().out
    report = json.loads((tmp_path / "align" / "diagnose" / "diagnose.json").read_text())
    assert len(report["before"]["distance_px"]) == len(report["after"]["entropy"]) == len(encoder.model.blocks)
    assert (tmp_path / "align" / "diagnose" / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
