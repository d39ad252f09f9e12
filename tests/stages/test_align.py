"""Phase 1 on Ray Train: DDP equals one worker, the aligned model loads, token-map alignment, refusals.

Resume, damaged checkpoints and killed workers: tests/train/test_train_faults.py (same set-up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from cskd_ray.config import ConfigError
from cskd_ray.stages import load_config
from cskd_ray.stages.align import run as run_align
from cskd_ray.stages.features import run as run_features
from cskd_ray.train.align import load_aligned

pytestmark = [pytest.mark.ray, pytest.mark.slow]


BASE = ["train.batch_size=16", "train.epochs=2", "train.warmup_steps=1", "train.checkpoint_every=2",
        "train.shuffle=false", "train.deterministic=true", "train.lr=0.01", "decode_batch_size=8"]


def _config(cache: str, output: Path, *overrides: str):
    return load_config("align", REPO / "jobs" / "configs" / "demo" / "align.yaml", [*BASE, *overrides],
                       input_uris=[cache], output_uri=str(output))


def _align(cache: str, output: Path, *overrides: str):
    return run_align(_config(cache, output, *overrides))


def test_align_rejects_a_folder_that_is_not_a_feature_cache(ray_session, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a feature cache"):
        _align(str(tmp_path), tmp_path / "out")


def test_ddp_two_workers_equal_one_worker_with_the_same_global_batch(feature_cache: str, tmp_path: Path) -> None:
    """2 DDP workers x 30 rows on Ray Train train the same weights as one process stepping the shared loop's
    ``train_step`` on all 60 rows, up to 2% of how far they moved; the aligned model (MLP projection) loads and
    projects into CLIP space.

    Each step uses the whole dataset (global batch = 60 rows), so a step sees the same set of rows whichever
    worker Ray Data hands them to, and test_vit has no batch statistics: averaging the two workers' mean
    gradients equals the one process's mean over 60 rows up to float summation order. AdamW divides by
    sqrt(v) + eps, which magnifies those rounding differences on near-zero gradients. The bound is therefore
    relative to the largest weight change (the difference seen here is about 1%), not an absolute epsilon.
    The one-worker reference runs in this process: a 1-worker Ray Train run of the same loop is what every other
    align test does, and it would add only Ray Train's fixed start-up cost here.
    """
    common = ("train.batch_size=60", "train.epochs=3", "train.checkpoint_every=100", "encoder.projection=mlp")
    two_run = _align(feature_cache, tmp_path / "two", *common, "train.num_workers=2")
    assert two_run.steps == 3 and two_run.rows == 60
    one = _one_process_reference(feature_cache, tmp_path / "one", *common)
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    initial = _initial_weights()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    differ = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"ddp: weights moved by up to {moved:.3e}; 1 process vs 2 workers differ by up to {differ:.3e}")
    assert moved > 1e-3, "training moved the weights"
    assert differ <= 0.02 * moved, f"1 process vs 2 workers differ by {differ:.2e}; weights moved by {moved:.2e}"
    model, preprocess, description = load_aligned(str(tmp_path / "two" / "model"))
    x = torch.zeros(2, 3, preprocess.image_size, preprocess.image_size)
    assert model(x).shape == (2, description["clip_dim"]) == (2, 32)
    assert description["encoder"]["projection"] == "mlp"


def _one_process_reference(cache: str, output: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The align stage's training, without Ray: the same config, task, optimizer and ``train_step``, each step on
    every cached row (decoded as the Ray Data ingest decodes them); the student's weights at the end."""
    from cskd_ray.io.feature_cache import FeatureCache
    from cskd_ray.models import create_encoder
    from cskd_ray.train.ingest import decode_cached_rows
    from cskd_ray.train.launch import TaskFactory
    from cskd_ray.train.step import make_optimizer, train_step

    cfg = _config(cache, output, *overrides)
    table = FeatureCache(cache).read(["uri", "feature", "error"])
    spec = create_encoder(cfg.encoder.name).preprocess.to_dict()
    batch = {k: torch.from_numpy(v) for k, v in decode_cached_rows(table, spec, cfg.max_pixels).items()}
    assert len(batch["valid"]) == cfg.train.batch_size  # one step = every row, as in the Ray run
    torch.manual_seed(cfg.train.seed)  # the loop seeds before building the task
    task = TaskFactory("cskd_ray.train.align", "AlignTask", {"clip_dim": 32})(cfg.model_dump(mode="json"))
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    total_steps = cfg.train.epochs
    optimizer, scheduler = make_optimizer(params, cfg.train, total_steps)
    scaler = torch.amp.GradScaler(enabled=False)
    for step in range(total_steps):
        train_step(task, batch, optimizer, scheduler, scaler, params, cfg.train, step, 0)
    return {k.removeprefix("student."): v.detach().clone() for k, v in task.state_dict().items()
            if k.startswith("student.")}


def _initial_weights() -> dict[str, torch.Tensor]:
    from cskd_ray.models import create_encoder
    from cskd_ray.models.heads import EncoderWithProjection, ProjectionHead

    torch.manual_seed(0)  # train.seed: the loop seeds before building the task
    encoder = create_encoder("test_vit")
    return EncoderWithProjection(encoder.model, ProjectionHead(encoder.dim, 32, "mlp")).state_dict()


@pytest.fixture(scope="module")
def token_cache(ray_session, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """CLIP token maps of a tiny ViT at 160 px, patch 16: a 10×10 grid, like timm's test_vit."""
    out = str(tmp_path_factory.mktemp("align-tokens") / "features")
    cfg = load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml",
                      ["batch_size=32", "clip.name=cskd-tiny-vit-160", "tokens=true", "max_images=24"],
                      input_uris=[str(demo_data / "images")], output_uri=out)
    run_features(cfg)
    return out


def test_token_cache_holds_clip_patch_tokens(token_cache: str, demo_data: Path) -> None:
    import numpy as np

    from cskd_ray.io.decode import decode_image
    from cskd_ray.io.feature_cache import FeatureCache
    from cskd_ray.io.transforms import normalize_batch, resize_crop
    from cskd_ray.models import create_clip

    cache = FeatureCache(token_cache, tokens=True)
    meta = cache.read_meta()
    assert meta["kind"] == "pooled+tokens" and meta["token_grid"] == [10, 10] and meta["token_dim"] == 64
    table = cache.read().filter(cache.read(["error"]).column("error").is_null())
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["tokens"]) == 10 * 10 * 64 and len(row["feature"]) == 32
    clip = create_clip("cskd-tiny-vit-160")
    clip.model.visual.output_tokens = True
    image = decode_image(Path(row["uri"]).read_bytes(), 10**8).image
    pixels = resize_crop(image, clip.preprocess)[None]
    with torch.no_grad():
        pooled, tokens = clip.model(normalize_batch(pixels, clip.preprocess))
    np.testing.assert_allclose(np.asarray(row["tokens"], np.float32), tokens.flatten().numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(row["feature"], np.float32), pooled[0].numpy(), atol=2e-2, rtol=1e-2)


def test_smooth_l1_tokens_alignment_trains_a_vit_on_token_maps(token_cache: str, tmp_path: Path) -> None:
    result = _align(token_cache, tmp_path / "tokens", "loss=smooth_l1_tokens", "train.max_steps=2",
                    "train.batch_size=8")
    from cskd_ray.io.feature_cache import FeatureCache

    with_feature = FeatureCache(token_cache, tokens=True).read(["error"]).column("error").null_count
    assert result.steps == 2 and result.rows == with_feature >= 20  # corrupt files have no feature
    description = json.loads((tmp_path / "tokens" / "model" / "model.json").read_text())
    assert description["target"] == "tokens" and description["clip_dim"] == 64
    assert 0.0 <= description["metrics"]["loss"] and -1.0 <= description["metrics"]["cosine"] <= 1.0
    model, _, _ = load_aligned(str(tmp_path / "tokens" / "model"))
    assert model.projection.net.out_features == 64


def test_smooth_l1_tokens_refuses_pooled_caches_and_mismatched_grids(feature_cache: str, token_cache: str,
                                                                      tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds pooled features only; run `features` with tokens: true"):
        _align(feature_cache, tmp_path / "a", "loss=smooth_l1_tokens")
    with pytest.raises(ConfigError, match=r"'test_resnet' is not a ViT"):
        _align(token_cache, tmp_path / "b", "loss=smooth_l1_tokens", "encoder.name=test_resnet")
    with pytest.raises(ConfigError, match=r"\(14, 14\) token grid, CLIP cskd-tiny-vit-160 has \(10, 10\)"):
        _align(token_cache, tmp_path / "c", "loss=smooth_l1_tokens", "encoder.name=vit_tiny_patch16_224")


def test_token_features_need_a_vit_clip(demo_data: Path, tmp_path: Path) -> None:
    from cskd_ray.stages.features import plan_features

    cfg = load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml",
                      ["clip.name=RN50", "tokens=true"], input_uris=[str(demo_data / "images")],
                      output_uri=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match=r"tokens: true needs a ViT CLIP.*'RN50' has none"):
        plan_features(cfg)


def test_align_trains_from_packed_images_without_reading_any_original(ray_session, demo_data: Path,
                                                                      tmp_path: Path) -> None:
    """features keeps each image in its cache row (here resized to 40 px: the demo images are 64 px); with every
    original deleted afterwards, align still decodes every row, and a rerun of features with another pack_size
    is refused, naming the key."""
    import io
    import shutil

    from PIL import Image

    from cskd_ray.io.feature_cache import FeatureCache
    from cskd_ray.stages.features import plan_features
    from cskd_ray.train.ingest import decode_cached_rows

    images = tmp_path / "images"
    shutil.copytree(demo_data / "images", images)
    cache = str(tmp_path / "features")
    cfg = load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml",
                      ["batch_size=32", "pack_size=40", "max_images=40"], input_uris=[str(images)], output_uri=cache)
    run_features(cfg)
    table = FeatureCache(cache, packed=True).read()
    ok = table.filter(table.column("error").is_null())
    assert FeatureCache(cache).read_meta()["pack_size"] == 40 and len(ok) >= 32
    assert all(min(Image.open(io.BytesIO(b)).size) == 40 for b in ok.column("image").to_pylist())
    assert table.filter(table.column("error").is_valid()).column("image").null_count == len(table) - len(ok)
    shutil.rmtree(images)

    spec = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    decoded = decode_cached_rows(ok, spec, 10**8)
    assert decoded["valid"].tolist() == [1] * len(ok)
    result = _align(cache, tmp_path / "out", "train.max_steps=2", "train.batch_size=16", "encoder.name=test_resnet",
                    "encoder.image_size=32")
    assert result.steps == 2 and result.rows == len(ok)
    assert result.metrics["loss"] > 0  # rows that could not be decoded would leave a zero loss
    with pytest.raises(ConfigError, match=r"pack_size: the cache .* keeps training images at pack_size 40"):
        plan_features(load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml",
                                  ["pack_size=64"], input_uris=[str(demo_data / "images")], output_uri=cache))
    rerun = load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml", [],
                        input_uris=[str(demo_data / "images")], output_uri=cache)
    assert plan_features(rerun).meta["pack_size"] == rerun.pack_size == 40  # not set: the cache's own value
    with pytest.raises(ConfigError, match=r"takes 64 px images, but the cache .* keeps them at pack_size 40"):
        _align(cache, tmp_path / "too-large", "encoder.name=test_resnet", "encoder.image_size=64")


def test_features_in_the_parts_layout_from_a_tar_feed_align_with_packed_images(ray_session, demo_data: Path,
                                                                                tmp_path: Path) -> None:
    """A WebDataset tar (36 members, 4 of them repeating other members' bytes in other parts) through features in
    the parts layout (parts of 12 rows, committed off the driver): one row per member with its tar key, copies
    carry their source's feature and packed image, and align trains on the committed parts with the tar gone."""
    import io

    import numpy as np
    from PIL import Image
    from sample_collections import write_webdataset_tar

    from cskd_ray.io.decode import decode_image
    from cskd_ray.io.feature_cache import FeatureCache
    from cskd_ray.io.part_pass import committed_parts

    files = sorted(p for p in (demo_data / "images").iterdir() if p.suffix == ".jpg")[:32]
    samples = [(f"{i:05d}", ".jpg", f.read_bytes()) for i, f in enumerate(files)]
    samples += [(f"{100 + i:05d}", ".jpg", samples[i * 7][2]) for i in range(4)]  # repeats, in other parts
    tar = write_webdataset_tar(tmp_path / "shard-00000.tar", samples)
    cache = str(tmp_path / "features")
    cfg = load_config("features", REPO / "jobs" / "configs" / "demo" / "features.yaml",
                      ["batch_size=16", "pack_size=40", "part_rows=12"], input_uris=[str(tar)], output_uri=cache)
    result = run_features(cfg)
    assert committed_parts(cache) == {0, 1, 2} and result.new_rows == 36 and result.reused >= 4
    table = FeatureCache(cache, packed=True).read()
    assert FeatureCache(cache).read_meta()["layout"] == "parts"
    assert sorted(table.column("key").to_pylist()) == sorted(key for key, _, _ in samples)
    by_key = {row["key"]: row for row in table.to_pylist()}
    ok = [row for row in by_key.values() if row["error"] is None]
    assert {row["key"] for row in ok} == {key for key, _, data in samples if decode_image(data).ok}
    assert all(min(Image.open(io.BytesIO(row["image"])).size) == 40 for row in ok)
    for i in range(4):
        copy, source = by_key[f"{100 + i:05d}"], by_key[f"{i * 7:05d}"]
        assert copy["sha256"] == source["sha256"] and copy["image"] == source["image"]
        if source["error"] is None:
            np.testing.assert_array_equal(copy["feature"], source["feature"])
    tar.unlink()
    trained = _align(cache, tmp_path / "out", "train.max_steps=2", "train.batch_size=16", "encoder.name=test_resnet",
                    "encoder.image_size=32")
    assert trained.steps == 2 and trained.rows == len(ok) and trained.metrics["loss"] > 0


@pytest.mark.parametrize("reshuffle", [True, False])
def test_the_shard_order_is_drawn_again_each_epoch_unless_deterministic(ray_session, tmp_path: Path,
                                                                        reshuffle: bool) -> None:
    """Six one-row shards read twice (two epochs) in file order (preserve_order): with the per-epoch reshuffle the
    two orders differ (the chance that two draws of 6! orders agree is 1/720, and the seed is fixed), without it
    they are the same."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image
    from ray.data import DataContext

    from cskd_ray.io.feature_cache import FeatureCache, feature_schema
    from cskd_ray.io.transforms import PreprocessSpec
    from cskd_ray.train.align import training_dataset

    sink = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(sink, format="PNG")
    cache = FeatureCache(str(tmp_path / "cache"), packed=True)
    cache.ensure_meta({"model_key": "k", "dim": 2, "pack_size": 16})
    for k in range(6):
        cache.write_shard(pa.table({"uri": [f"gone-{k}.png"], "sha256": [f"d{k}"],
                                    "feature": pa.array([[float(k), 0.0]], pa.large_list(pa.float16())),
                                    "image": pa.array([sink.getvalue()], pa.large_binary()),
                                    "error": pa.nulls(1, pa.string())}, schema=feature_schema(packed=True)))
    context = DataContext.get_current()
    before, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        ds, rows = training_dataset(cache.uri, PreprocessSpec(16, (0.5,) * 3, (0.5,) * 3), 4, 10**8, seed=3,
                                    reshuffle_each_epoch=reshuffle)
        epochs = [[int(row["target"][0]) for row in ds.iter_rows()] for _ in range(2)]
    finally:
        context.execution_options.preserve_order = before
    assert rows == 6 and all(sorted(order) == list(range(6)) for order in epochs)
    assert (epochs[0] != epochs[1]) is reshuffle, epochs
    assert np.all([row["valid"] for row in ds.take_all()])
