"""Hou et al.'s combined teacher (arXiv 2206.00809): frozen classifiers + MLP head trained by `teacher`, distilled by
`distill` (hidden layer and prediction) with the teacher outside the optimiser and the checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file

from cskd_ray.config import ConfigError
from cskd_ray.losses import cosine_alignment, emd_loss, feature_mse
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.models.multilevel import Backbone, create_multilevel_encoder
from cskd_ray.models.saved import load_scoring_model
from cskd_ray.stages import check_stage, load_config
from cskd_ray.train.distill import DistillTask

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
CONFIGS = REPO / "jobs" / "configs" / "demo"
HEAD = {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0}
CLASSIFIERS = ("classifiers={backbones: [{name: test_resnet}, {name: test_efficientnet, levels: [2, 4]}], "
               "levels: [-2, -1], image_size: 48}")


def _labels(demo: Path) -> list[str]:
    return [f"labels.images_root={demo / 'images'}", f"labels.test_list={demo / 'test.jpgl'}",
            "labels.val_split=test", "labels.val_fraction=0", "decode_batch_size=8"]


def _teacher(demo: Path, out: Path, *overrides: str):
    return load_config("teacher", CONFIGS / "teacher-classifiers.yaml", [*_labels(demo), *overrides],
                       input_uris=[str(demo / "AVA.txt")], output_uri=str(out))


def _distill(demo: Path, out: Path, *overrides: str):
    return load_config("distill", CONFIGS / "distill.yaml", [*_labels(demo), "aligned=null", *overrides],
                       input_uris=[str(demo / "AVA.txt")], output_uri=str(out))


def save_hou_teacher(folder: Path) -> Path:
    """A combined-teacher folder (random weights) as `teacher` with classifiers and hidden_dim writes it."""
    torch.manual_seed(0)
    encoder = create_multilevel_encoder([Backbone("test_resnet", levels=(-1,)), Backbone("test_efficientnet")], 48)
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10, hidden=16))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    description = {"stage": "teacher", "head": {**HEAD, "hidden": 16}, "preprocess": encoder.preprocess.to_dict(),
                   "encoder": {"name": encoder.name, "kind": "classifiers", "image_size": 48, "levels": [-3, -2, -1],
                               "backbones": [{"name": "test_resnet", "levels": [-1]}, {"name": "test_efficientnet"}]}}
    (folder / "model.json").write_text(json.dumps(description))
    return folder


def _batch(n: int = 6, size: int = 64) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(2)
    dist = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    return {"pixels": torch.from_numpy(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)),
            "valid": torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.uint8),
            "labeled": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.uint8),
            "has_feature": torch.zeros(n, dtype=torch.uint8), "feature": torch.zeros(n, 1),
            "score": torch.from_numpy((dist * np.arange(1, 11)).sum(1)), "distribution": torch.from_numpy(dist),
            "row": torch.arange(n)}


def test_bad_classifier_configs_fail_before_training_naming_the_key(demo_data: Path, tmp_path: Path) -> None:
    bad_name = ("classifiers={backbones: [{name: test_resnet}, {name: resnet_nope}]}")
    with pytest.raises(ConfigError, match=r"classifiers\.backbones\.1\.name: unknown timm encoder model 'resnet_nope'"):
        check_stage("teacher", _teacher(demo_data, tmp_path / "t", bad_name))
    with pytest.raises(ConfigError, match=r"classifiers\.backbones\.0\.levels \(from classifiers\.levels\): levels "
                                          r"\[7\]: test_resnet has 5 feature levels"):
        check_stage("teacher", _teacher(demo_data, tmp_path / "t", "classifiers.levels=[7]"))
    with pytest.raises(ConfigError, match=r"classifiers and aligned.*set aligned: null"):
        _teacher(demo_data, tmp_path / "t", "aligned=runs/demo/align-student/model")
    with pytest.raises(ConfigError, match=r"classifiers: a teacher option.*hou_teacher"):
        _distill(demo_data, tmp_path / "s", CLASSIFIERS)
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    (pseudo / "_meta.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"hou_teacher .*nowhere: not a model folder"):
        check_stage("distill", _distill(demo_data, tmp_path / "s", f"pseudo_labels={pseudo}", "feat_weight=0",
                                        f"hou_teacher={tmp_path / 'nowhere'}"))


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_hou_terms_distil_hidden_layer_and_prediction_on_every_valid_row(demo_data: Path, tmp_path: Path,
                                                                        loss: str) -> None:
    teacher_dir = save_hou_teacher(tmp_path / "hou")
    stage = _distill(demo_data, tmp_path / "s", "kd_weight=0", "feat_weight=0", f"hou_teacher={teacher_dir}",
                     "hou_feature_weight=0.5", "hou_prediction_weight=0.25", f"hou_feature_loss={loss}")
    task = DistillTask(stage.model_dump(), HEAD, clip_dim=1).train()
    teacher = task.hou_teacher
    assert teacher.dim == 16 and task.hou_projection.net.out_features == 16
    batch = _batch()
    out = task(batch)
    valid = [0, 1, 2, 3, 4]
    with torch.no_grad():
        hidden, prediction = teacher(batch["pixels"].permute(0, 3, 1, 2).float()[valid] / 255.0)
        feats, probs = task._student(batch["pixels"].permute(0, 3, 1, 2).float()[valid] / 255.0)
        d = cosine_alignment if loss == "cosine" else feature_mse
        torch.testing.assert_close(out["hou_feat"].detach(), d(task.hou_projection(feats), hidden))
        torch.testing.assert_close(out["hou_pred"].detach(), emd_loss(probs, prediction, r=2.0))
    assert out["hou_feat"] > 0 and out["hou_pred"] > 0
    torch.testing.assert_close(out["loss"].detach(),
                               (out["sup"] + 0.5 * out["hou_feat"] + 0.25 * out["hou_pred"]).detach())
    out["loss"].backward()
    assert not teacher.model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert task.hou_projection.net.weight.grad is not None
    assert not {id(p) for p in task.trainable_parameters()} & {id(p) for p in teacher.parameters()}
    assert all(k.startswith(("model.", "hou_projection.")) for k in task.state_dict())  # never checkpointed


@pytest.mark.ray
@pytest.mark.slow
def test_combined_teacher_trains_head_only_and_its_folder_loads_everywhere(ray_session, demo_data: Path,
                                                                          tmp_path: Path) -> None:
    """The teacher stage with classifiers (2 steps, validated) writes a folder every stage loads, and trains the
    head only. The student side under Ray Train (both Hou terms logged, only the student checkpointed) is part of the
    distill run in tests/stages/test_distill.py, which turns every term on at once."""
    from cskd_ray.stages.teacher import run as run_teacher

    result = run_teacher(_teacher(demo_data, tmp_path / "hou", CLASSIFIERS, "hidden_dim=16", "train.batch_size=4",
                                  "train.max_steps=2", "train.warmup_steps=1"))
    assert result.steps == 2 and "val_srcc" in result.metrics
    folder = tmp_path / "hou" / "model"
    description = json.loads((folder / "model.json").read_text())
    assert description["encoder"]["kind"] == "classifiers" and description["head"]["hidden"] == 16
    assert description["encoder"]["name"] == "classifiers:test_resnet+test_efficientnet"
    weights = load_file(str(folder / "model.safetensors"))
    first = json.loads((tmp_path / "hou" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] > 0
    scorer = load_scoring_model(str(folder))  # what evaluate, score and label load
    assert set(weights) == set(scorer.model.state_dict())
    scores, dists = scorer.predict(torch.zeros(2, 3, 48, 48))
    assert scores.shape == (2,) and dists.shape == (2, 10)
    # the frozen classifiers did not move: they are still the seeded random init the folder was built from
    torch.manual_seed(0)
    fresh = create_multilevel_encoder([Backbone("test_resnet", levels=(-2, -1)),
                                       Backbone("test_efficientnet", levels=(2, 4))], 48).model
    frozen = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    assert all(torch.equal(frozen[k], v) for k, v in fresh.state_dict().items())
