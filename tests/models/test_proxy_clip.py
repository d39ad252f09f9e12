"""The demo's proxy CLIP: a deterministic build, sha256-verified built weights, loaded through create_clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cskd_ray.io.transforms import normalize_batch, resize_crop
from cskd_ray.models import proxy_clip
from cskd_ray.models.proxy_clip import PROXY_NAME, ProxyBuildConfig, build_proxy, save_weights
from cskd_ray.models.registry import WeightsUnavailableError, create_clip


def test_build_is_deterministic_and_loads_through_create_clip(tmp_path: Path) -> None:
    """Two builds of a tiny configuration give byte-identical files, which create_clip loads by path."""
    cfg = ProxyBuildConfig(num_images=12, epochs=1, batch_size=4, workers=1)
    digests = [save_weights(build_proxy(cfg, log=lambda line: None)[0], tmp_path / f"{i}.safetensors")
               for i in range(2)]
    assert digests[0] == digests[1]
    loaded = create_clip(PROXY_NAME, str(tmp_path / "0.safetensors"))
    assert loaded.weights == f"sha256:{digests[0]}" and not loaded.random_weights


def test_built_proxy_is_verified_and_knows_the_demo_world(demo_data: Path) -> None:
    """``pretrained: proxy`` resolves to the built file with the recorded sha256; demo images' embeddings differ."""
    record = proxy_clip.read_record()
    loaded = create_clip(PROXY_NAME, "proxy")
    assert loaded.weights == f"sha256:{record['sha256']}" and loaded.dim == 48
    # the record's held-out R² of the properties the hidden score depends on (built without any score)
    assert min(record["summary"]["held_out_r2"][k] for k in ("exposure_ev", "contrast", "saturation")) > 0.5
    files = sorted((demo_data / "images").glob("1000[0-7]?.jpg"))[:8]
    pixels = np.stack([resize_crop(Image.open(f).convert("RGB"), loaded.preprocess) for f in files])
    with torch.no_grad():
        u = torch.nn.functional.normalize(loaded.model(normalize_batch(pixels, loaded.preprocess)), dim=-1)
    off_diagonal = (u @ u.T)[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.mean() < 0.9  # a random tower's embeddings are nearly parallel (cosine about 0.99)


def test_a_changed_weights_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = {**proxy_clip.read_record(), "sha256": "0" * 64}
    (tmp_path / "record.json").write_text(json.dumps(record))
    monkeypatch.setattr(proxy_clip, "RECORD_PATH", tmp_path / "record.json")
    with pytest.raises(WeightsUnavailableError, match=r"sha256 .* records 0{64}.*--record"):
        create_clip(PROXY_NAME, "proxy")


def test_proxy_tag_belongs_to_the_proxy_model_only() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"'proxy' exists only for cskd-proxy-rn, not 'cskd-tiny-vit'"):
        create_clip("cskd-tiny-vit", "proxy")


def test_a_build_recorded_for_another_kind_of_cpu_is_accepted(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of CPU builds other bits: a file matching any recorded build loads."""
    record = proxy_clip.read_record()
    other = {**record, "sha256": "0" * 64, "other_builds": [{"sha256": record["sha256"], "built_on": "this CPU"}]}
    (tmp_path / "record.json").write_text(json.dumps(other))
    monkeypatch.setattr(proxy_clip, "RECORD_PATH", tmp_path / "record.json")
    assert create_clip(PROXY_NAME, "proxy").weights == f"sha256:{record['sha256']}"
