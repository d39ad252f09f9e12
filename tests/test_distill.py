"""Phase 2c: the loss terms land on the right rows with the right weights, and a distill run trains end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from cskd_ray.config import ConfigError, load_config
from cskd_ray.data.transforms import normalize_batch
from cskd_ray.features import run_features
from cskd_ray.labeling import run_label
from cskd_ray.losses import cosine_alignment, emd_loss
from cskd_ray.models import create_encoder
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.train.distill import DistillTask, run_distill

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
CONFIG = REPO / "jobs" / "configs" / "demo" / "distill.yaml"
HEAD = {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0}


def _stage(demo: Path, out: Path, *overrides: str) -> dict:
    base = [f"labels.images_root={demo / 'images'}", f"labels.test_list={demo / 'test.jpgl'}", "aligned=null",
            "train.batch_size=8", "train.epochs=1", "train.warmup_steps=1", "decode_batch_size=8"]
    return load_config("distill", CONFIG, [*base, *overrides], input_uris=[str(demo / "AVA.txt")],
                       output_uri=str(out))


def _batch(n: int = 6, size: int = 160, dim: int = 32) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(1)
    dist = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    return {"pixels": torch.from_numpy(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)),
            "valid": torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.uint8),
            "labeled": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.uint8),
            "has_feature": torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.uint8),
            "feature": torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32)),
            "score": torch.from_numpy((dist * np.arange(1, 11)).sum(1)), "distribution": torch.from_numpy(dist)}


def test_each_term_uses_its_rows_and_weight(demo_data: Path, tmp_path: Path) -> None:
    stage = _stage(demo_data, tmp_path, "kd_weight=0.7", "feat_weight=0.3").model_dump()
    task = DistillTask(stage, HEAD, clip_dim=32)
    batch = _batch()
    out = task(batch)
    with torch.no_grad():
        feats = task.model.encoder(normalize_batch(batch["pixels"], task.preprocess))
        probs = task.model.head(feats)
        sup = emd_loss(probs[[0, 1]], batch["distribution"][[0, 1]], r=2.0)
        kd = emd_loss(probs[[2, 3, 4]], batch["distribution"][[2, 3, 4]], r=2.0)  # row 5 is invalid
        feat = cosine_alignment(task.projection(feats)[[2, 4]], batch["feature"][[2, 4]])
    for name, want in (("sup", sup), ("kd", kd), ("feat", feat)):
        torch.testing.assert_close(out[name].detach(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), sup + 0.7 * kd + 0.3 * feat, rtol=1e-4, atol=1e-6)
    out["loss"].backward()
    assert task.projection.net.weight.grad is not None


def test_zero_weights_turn_terms_off(demo_data: Path, tmp_path: Path) -> None:
    task = DistillTask(_stage(demo_data, tmp_path, "kd_weight=0", "feat_weight=0").model_dump(), HEAD, clip_dim=32)
    out = task(_batch())
    assert task.projection is None and "feat" not in out
    torch.testing.assert_close(out["loss"], out["sup"])


@pytest.mark.ray
@pytest.mark.slow
def test_distill_trains_on_labels_pseudo_labels_and_features(ray_session, demo_data: Path, tmp_path: Path) -> None:
    features = str(tmp_path / "features")
    run_features(load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml", ["batch_size=32"],
                             input_uris=[str(demo_data / "images")], output_uri=features))
    torch.manual_seed(0)
    encoder = create_encoder("test_vit")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(teacher / "model.safetensors"))
    (teacher / "model.json").write_text(json.dumps({"stage": "teacher", "encoder": {"name": "test_vit"}, "head": HEAD,
                                                    "preprocess": encoder.preprocess.to_dict()}))
    pseudo = str(tmp_path / "pseudo")
    run_label(load_config("label", REPO / "jobs" / "configs" / "demo" / "label.yaml", [f"model={teacher}"],
                          input_uris=[str(demo_data / "unlabeled.csv")], output_uri=pseudo))
    cfg = load_config("distill", CONFIG, [f"labels.images_root={demo_data / 'images'}",
                                          f"labels.test_list={demo_data / 'test.jpgl'}", "aligned=null",
                                          f"pseudo_labels={pseudo}", f"features={features}", "train.batch_size=8",
                                          "train.epochs=1", "decode_batch_size=8"],
                      input_uris=[str(demo_data / "AVA.txt")], output_uri=str(tmp_path / "student"))
    result = run_distill(cfg)
    # 15 labeled images minus the validation split, plus the 45 unlabeled ones that decode (the 4 corrupt
    # files are error rows in the pseudo-label table and are left out)
    assert result.train_rows == (15 - result.val_rows) + 45
    description = json.loads((tmp_path / "student" / "model" / "model.json").read_text())
    assert description["stage"] == "distill" and "val_srcc" in description["metrics"]
    assert {"sup", "kd", "feat"} <= set(description["metrics"])


def test_distill_needs_a_pseudo_label_table(ray_session, demo_data: Path, tmp_path: Path) -> None:
    cfg = load_config("distill", CONFIG, [f"labels.images_root={demo_data / 'images'}",
                                          f"labels.test_list={demo_data / 'test.jpgl'}", "aligned=null",
                                          f"pseudo_labels={tmp_path}"],
                      input_uris=[str(demo_data / "AVA.txt")], output_uri=str(tmp_path / "student"))
    with pytest.raises(ConfigError, match=r"not a pseudo-label table; run `label` first"):
        run_distill(cfg)
