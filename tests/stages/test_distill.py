"""Phase 2c: the loss terms land on the right rows with the right weights, and a distill run trains end to end."""

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
from cskd_ray.io.transforms import normalize_batch
from cskd_ray.losses import cosine_alignment, emd_loss
from cskd_ray.models import create_encoder
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.stages import load_config
from cskd_ray.stages.distill import run as run_distill
from cskd_ray.train import augment
from cskd_ray.train.distill import DistillTask

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
CONFIG = REPO / "jobs" / "configs" / "demo" / "distill.yaml"
HEAD = {"kind": "distribution", "bins": 10, "low": 1.0, "high": 10.0, "threshold": 5.0}


def _stage(demo: Path, out: Path, *overrides: str) -> dict:
    base = [f"labels.images_root={demo / 'images'}", f"labels.test_list={demo / 'test.jpgl'}", "aligned=null",
            "labels.val_split=test", "labels.val_fraction=0",  # 15 labeled images: the test rows validate
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
            "score": torch.from_numpy((dist * np.arange(1, 11)).sum(1)), "distribution": torch.from_numpy(dist),
            "row": torch.arange(100, 100 + n)}


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


def _save_teacher(folder: Path, name: str = "test_vit") -> Path:
    """A teacher model folder (random weights) as the teacher stage writes it."""
    torch.manual_seed(0)
    encoder = create_encoder(name)
    folder.mkdir(parents=True)
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, "distribution", 10))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({"stage": "teacher", "encoder": {"name": name}, "head": HEAD,
                                                   "preprocess": encoder.preprocess.to_dict()}))
    return folder


EXTRA_TEACHERS = ("extra_teachers=[{kind: clip, name: cskd-tiny-vit, weight: 0.25}, "
                  "{kind: timm, name: test_resnet, weight: 0.5, projection: mlp}]")


def test_consistency_term_is_emd_of_strong_student_view_to_weak_teacher_view(demo_data: Path, tmp_path: Path) -> None:
    teacher = _save_teacher(tmp_path / "teacher", "test_vit2")
    stage = _stage(demo_data, tmp_path, "kd_weight=0.5", "feat_weight=0", "consistency_weight=0.8",
                   f"teacher_model={teacher}",
                   "augment.noise=0.1")
    task = DistillTask(stage.model_dump(), HEAD, clip_dim=32)
    task.set_epoch(1)
    batch = _batch()
    out = task(batch)
    with torch.no_grad():
        images = (batch["pixels"].permute(0, 3, 1, 2).float() / 255.0)[[2, 3, 4]]  # valid and unlabeled
        rng = augment.RowRandom(((0 * 1_000_003 + 1) << 32) + row for row in (102, 103, 104))  # seed, epoch, row
        target = task.teacher(augment.weak(images, rng))
        strong = augment.strong(images, 0.5, 0.4, 0.1, rng)
        student = task.model(normalize_batch((strong * 255).permute(0, 2, 3, 1), task.preprocess))
        assert not torch.allclose(strong, images)
        want = emd_loss(student, target, r=2.0)
    torch.testing.assert_close(out["cons"].detach(), want, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), (out["sup"] + 0.5 * out["kd"] + 0.8 * out["cons"]).detach())


def test_no_gradient_reaches_any_teacher_and_they_stay_in_eval(demo_data: Path, tmp_path: Path) -> None:
    teacher = _save_teacher(tmp_path / "teacher")
    stage = _stage(demo_data, tmp_path, "consistency_weight=1.0", f"teacher_model={teacher}", EXTRA_TEACHERS)
    task = DistillTask(stage.model_dump(), HEAD, clip_dim=32).train()
    teachers = [task.teacher, *task.extra_teachers]
    assert [t.name for t in task.extra_teachers] == ["clip:cskd-tiny-vit", "timm:test_resnet"]
    out = task(_batch(size=64))
    assert {"cons", "teacher_0", "teacher_1"} <= set(out)
    out["loss"].backward()
    for frozen in teachers:
        assert not frozen.model.training
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(p.grad is not None for p in task.extra_projections.parameters())
    trainable = {id(p) for p in task.trainable_parameters()}
    assert not trainable & {id(p) for frozen in teachers for p in frozen.parameters()}
    assert not any(k.startswith(("teacher", "extra_teachers.")) for k in task.state_dict())  # not checkpointed


def test_extra_teacher_terms_are_weighted_cosine_alignments(demo_data: Path, tmp_path: Path) -> None:
    stage = _stage(demo_data, tmp_path, "kd_weight=0", "feat_weight=0", EXTRA_TEACHERS)
    task = DistillTask(stage.model_dump(), HEAD, clip_dim=32)
    batch = _batch(size=64)
    out = task(batch)
    valid = [0, 1, 2, 3, 4]
    with torch.no_grad():
        images = batch["pixels"].permute(0, 3, 1, 2).float()[valid] / 255.0
        feats = task.model.encoder(normalize_batch(batch["pixels"][valid], task.preprocess))
        for i, (frozen, projection) in enumerate(zip(task.extra_teachers, task.extra_projections, strict=True)):
            want = cosine_alignment(projection(feats), frozen(images))
            torch.testing.assert_close(out[f"teacher_{i}"].detach(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(),
                               (out["sup"] + 0.25 * out["teacher_0"] + 0.5 * out["teacher_1"]).detach())


def test_consistency_needs_a_teacher_model(demo_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"consistency_weight > 0 needs teacher_model"):
        _stage(demo_data, tmp_path, "consistency_weight=0.5")
    with pytest.raises(ConfigError, match=r"extra_teachers.0.kind"):
        _stage(demo_data, tmp_path, "extra_teachers=[{kind: resnet, name: x}]")


def test_augmentations_keep_shape_and_range_and_follow_the_generator() -> None:
    images = torch.rand(4, 3, 32, 32)
    flipped = augment.weak(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images, strict=True))
    a = augment.strong(images, generator=torch.Generator().manual_seed(1))
    b = augment.strong(images, generator=torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    assert (a - images).abs().mean() > 0.02
    # per-row draws: a row's views depend on its key only, not on the rows beside it (DDP splits, resumes)
    whole = augment.strong(images, generator=augment.RowRandom([7, 8, 9, 10]))
    part = augment.strong(images[[3, 1]], generator=augment.RowRandom([10, 8]))
    torch.testing.assert_close(part, whole[[3, 1]])
    assert not torch.allclose(whole[0], augment.strong(images[:1], generator=augment.RowRandom([11]))[0])


@pytest.mark.ray
@pytest.mark.slow
def test_distill_trains_on_labels_pseudo_labels_and_features(feature_cache: str, teacher_run: Path, demo_data: Path,
                                                             tmp_path: Path) -> None:
    """The session's feature cache and trained teacher (its pseudo-labels of unlabeled.csv, and the teacher itself
    online for the consistency term), with two extra frozen teachers and a Hou et al. combined teacher (hidden layer
    and prediction terms), on 2 DDP workers of 4 rows each under Ray Train (its process group carries the loss terms'
    row counts and the metrics; tests/train/test_ddp_equivalence.py checks the same step against 1 worker, with steps
    where a worker has no row of a term). Only the student is checkpointed: no frozen teacher's weights."""
    from test_multi_teacher import save_hou_teacher

    teacher = teacher_run / "teacher" / "model"
    hou = save_hou_teacher(tmp_path / "hou")
    cfg = load_config("distill", CONFIG, [f"labels.images_root={demo_data / 'images'}",
                                          f"labels.test_list={demo_data / 'test.jpgl'}", "aligned=null",
                                          f"pseudo_labels={teacher_run / 'pseudo-labels'}", f"features={feature_cache}",
                                          "train.batch_size=8", "train.num_workers=2", "train.epochs=1",
                                          "decode_batch_size=8",
                                          "consistency_weight=0.5", f"teacher_model={teacher}", EXTRA_TEACHERS,
                                          f"hou_teacher={hou}", "hou_feature_weight=0.5", "hou_prediction_weight=0.5"],
                      input_uris=[str(demo_data / "AVA.txt")], output_uri=str(tmp_path / "student"))
    result = run_distill(cfg)
    # the YAML's honest split: 15 labeled images minus the carved validation split and minus the test split
    # (never trained on), plus the 45 unlabeled ones that decode (the 4 corrupt files are error rows in the
    # pseudo-label table and are left out)
    num_test = len((demo_data / "test.jpgl").read_text().split())
    assert result.val_rows > 0 and result.train_rows == (15 - result.val_rows - num_test) + 45
    description = json.loads((tmp_path / "student" / "model" / "model.json").read_text())
    assert description["stage"] == "distill" and "val_srcc" in description["metrics"]
    terms = {"sup", "kd", "feat", "cons", "teacher_0", "teacher_1", "hou_feat", "hou_pred"}
    assert terms <= set(description["metrics"])
    history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in history if "hou_feat" in row]
    assert logged and all(row["hou_feat"] > 0 and row["hou_pred"] > 0 for row in logged)
    [checkpoint] = sorted((tmp_path / "student" / "train").glob("checkpoint_*/model.safetensors"))[-1:]
    keys = set(load_file(str(checkpoint)))
    # the student and its projections; no frozen teacher (CLIP, timm, the online teacher, Hou's classifiers)
    assert {k.split(".")[0] for k in keys} == {"model", "projection", "extra_projections", "hou_projection"}


def test_distill_needs_a_pseudo_label_table(ray_session, demo_data: Path, tmp_path: Path) -> None:
    cfg = load_config("distill", CONFIG, [f"labels.images_root={demo_data / 'images'}",
                                          f"labels.test_list={demo_data / 'test.jpgl'}", "aligned=null",
                                          f"pseudo_labels={tmp_path}"],
                      input_uris=[str(demo_data / "AVA.txt")], output_uri=str(tmp_path / "student"))
    with pytest.raises(ConfigError, match=r"not a pseudo-label table; run `label` first"):
        run_distill(cfg)


def test_labels_only_student_trains_on_labeled_rows_only(demo_data: Path, tmp_path: Path) -> None:
    from cskd_ray.train.distill import uses_unlabeled

    off = ["kd_weight=0", "feat_weight=0"]
    assert not uses_unlabeled(_stage(demo_data, tmp_path, *off))
    assert uses_unlabeled(_stage(demo_data, tmp_path, "kd_weight=0.1", "feat_weight=0"))
    assert uses_unlabeled(_stage(demo_data, tmp_path, *off, "extra_teachers=[{kind: timm, name: test_vit}]"))
    assert not uses_unlabeled(_stage(demo_data, tmp_path, *off, "extra_teachers=[{kind: timm, name: x, weight: 0}]"))


def test_preflight_reads_the_feature_cache_only_when_the_feature_term_is_on(demo_data: Path, tmp_path: Path) -> None:
    from cskd_ray.stages import check_stage

    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    (pseudo / "_meta.json").write_text("{}")
    missing = [f"pseudo_labels={pseudo}", f"features={tmp_path / 'no-cache'}"]
    check_stage("distill", _stage(demo_data, tmp_path / "out", *missing, "feat_weight=0"))  # a best_config.yaml case
    with pytest.raises(ConfigError, match=r"no such feature cache; run `features` first"):
        check_stage("distill", _stage(demo_data, tmp_path / "out", *missing, "feat_weight=0.5"))
