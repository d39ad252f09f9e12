"""The features stage end to end on a local Ray: rows, schema, cache reuse, dedupe, S3, errors, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, upload_dir

from cskd_ray.app.cli import main
from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import FeatureCache, feature_schema
from cskd_ray.io.transforms import normalize_batch, resize_crop
from cskd_ray.models import create_clip
from cskd_ray.stages import load_config
from cskd_ray.stages.features import plan_features
from cskd_ray.stages.features import run as run_features

pytestmark = [pytest.mark.ray]
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo" / "features.yaml"


def _cfg(inputs: list[str], output: str, *overrides: str):
    return load_config("features", DEMO_CONFIG, ["batch_size=16", "decode_batch_size=8", *overrides],
                       input_uris=inputs, output_uri=output)


def _table(output: str) -> pa.Table:
    return FeatureCache(output).read()


@pytest.fixture
def images(demo_data: Path, tmp_path: Path) -> Path:
    """A private copy of the demo images (tests add files to it)."""
    return Path(shutil.copytree(demo_data / "images", tmp_path / "images"))


def test_one_row_per_input_with_schema_meta_and_errors(ray_session, images: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "features")
    result = run_features(_cfg([str(images)], out))
    table = _table(out)
    files = sorted(str(p) for p in images.iterdir())
    assert sorted(table.column("uri").to_pylist()) == files
    assert table.schema.equals(feature_schema("float16", packed=True))  # pack_size 256 by default
    assert result.new_rows == len(files) == 64 and result.computed == 64 and result.errors == 4
    # the demo images are 64 px, under pack_size: each row keeps its file's bytes as they are
    ok_rows = table.filter(table.column("error").is_null()).to_pylist()
    assert all(row["image"] == Path(row["uri"]).read_bytes() for row in ok_rows)
    errors = table.filter(table.column("error").is_valid())
    assert errors.column("feature").null_count == 4
    messages = " | ".join(errors.column("error").to_pylist())
    for expected in ("empty file", "truncated", "not an image"):
        assert expected in messages
    ok = table.filter(table.column("error").is_null())
    assert {len(f) for f in ok.column("feature").to_pylist()} == {32}
    meta = json.loads((Path(out) / "_meta.json").read_text())
    assert meta["model"] == "cskd-tiny-vit" and meta["random_weights"] is True and meta["dim"] == 32
    assert meta["preprocess"]["image_size"] == 64 and len(meta["model_key"]) == 16
    assert len(list((Path(out) / "_runs").iterdir())) == 1


def test_features_equal_direct_model_forward(ray_session, images: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "features")
    run_features(_cfg([str(images)], out, "feature_dtype=float32"))
    table = _table(out)
    table = table.filter(table.column("error").is_null())
    uris = table.column("uri").to_pylist()[:5]
    clip = create_clip("cskd-tiny-vit", None, seed=0)
    pixels = np.stack([resize_crop(decode_image(Path(u).read_bytes()).image, clip.preprocess) for u in uris])
    with torch.inference_mode():
        expected = clip.model(normalize_batch(pixels, clip.preprocess)).numpy()
    got = np.asarray(table.column("feature").to_pylist()[:5], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_partial_run_full_run_rerun_and_added_images_compute_only_what_is_missing(
    ray_session, images: Path, tmp_path: Path
) -> None:
    """A partial run (20 of 64), a kill's leftover temp file, the full run (the other 44), a rerun (nothing), then 3
    added files (one a copy of known content: reused, not computed); another CLIP into the same output is refused."""
    out = str(tmp_path / "features")
    partial = run_features(_cfg([str(images)], out, "max_images=20"))
    assert partial.new_rows == 20
    (Path(out) / "part-killed.parquet.tmp-0123abcd").write_bytes(b"half a shard")  # what a kill mid-write leaves
    first = run_features(_cfg([str(images)], out))
    assert first.already_cached == 20 and first.new_rows == 44 and len(_table(out)) == first.inputs == 64
    shards = sorted(p.name for p in Path(out).glob("part-*.parquet"))
    again = run_features(_cfg([str(images)], out))
    assert again.new_rows == 0 and again.computed == 0 and again.already_cached == first.inputs
    assert sorted(p.name for p in Path(out).glob("part-*.parquet")) == shards
    assert len(list((Path(out) / "_runs").iterdir())) == 2  # a run that computes nothing writes no summary

    good = sorted(p for p in images.iterdir() if decode_image(p.read_bytes()).ok)
    shutil.copy(good[0], images / "copy-of-first.jpg")  # known content at a new URI: reused
    _save_new_image(images / "brand-new-1.png", 1)
    _save_new_image(images / "brand-new-2.png", 2)
    added = run_features(_cfg([str(images)], out))
    assert (added.new_rows, added.computed, added.reused) == (3, 2, 1)
    table = _table(out)
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == first.inputs + 3
    by_uri = dict(zip(uris, table.column("feature").to_pylist(), strict=True))
    assert by_uri[str(images / "copy-of-first.jpg")] == by_uri[str(good[0])]
    packed = dict(zip(uris, table.column("image").to_pylist(), strict=True))
    assert packed[str(images / "copy-of-first.jpg")] == packed[str(good[0])] == good[0].read_bytes()
    with pytest.raises(ConfigError, match=r"holds results of cskd-tiny-vit .*choose another output"):
        plan_features(_cfg([str(images)], out, "clip.seed=1"))


def _save_new_image(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)


def test_registry_claims_are_idempotent_per_row() -> None:
    """A re-executed read task (worker died, or its block rebuilt from lineage) claims with the same row ids and
    must be told again to compute what it owns; other rows with that content, and cached content, are deferred."""
    from cskd_ray.io.read_tasks import ContentRegistry

    registry = ContentRegistry()
    registry.add(["cached"])
    first = registry.claim(["a", "b", "a", "cached"], [0, 1, 2, 3])
    assert first == [True, True, False, False]  # row 2 repeats row 0's content in the same batch
    assert registry.claim(["b", "c"], [7, 8]) == [False, True]  # another task: b is row 1's
    assert registry.claim(["a", "b", "a", "cached"], [0, 1, 2, 3]) == first  # the task again: the same answers
    assert registry.claim(["c"], [8]) == [True]


def test_rows_without_a_representative_fail_loudly() -> None:
    from cskd_ray.io.row_pipeline import expand_to_uris

    table = pa.table({"uri": ["x/a"], "sha256": ["d1"], "error": pa.nulls(1, pa.string())})
    out = expand_to_uris(table, {"d1": ["x/b", "x/c"]})
    assert out.column("uri").to_pylist() == ["x/b", "x/c"] and out.column("sha256").to_pylist() == ["d1", "d1"]
    with pytest.raises(RuntimeError, match=r"1 contents have no representative row \(e.g. x/d\); their 2 inputs"):
        expand_to_uris(table, {"d1": ["x/b"], "d2": ["x/d", "x/e"]})


def _dies_once_after_claiming(marks: Path, duplicated: set[str]):
    """A read task that, on its first attempt at a batch holding duplicated content, claims and then kills its
    worker process (as a node loss would): Ray Data retries the task (max_retries=-1) with the same block."""
    import hashlib
    import os

    def read(batch: dict, **kwargs) -> dict:
        from cskd_ray.io import read_tasks as feature_tasks

        out = feature_tasks.read_decode_batch(batch, **kwargs)  # in the worker: the real task, claims made
        uris = [str(u) for u in batch["uri"]]
        mark = marks / hashlib.sha256(uris[0].encode()).hexdigest()
        if duplicated & set(uris) and not mark.exists():
            mark.touch()
            os._exit(1)
        return out

    return read


def test_duplicate_content_is_computed_once_even_when_read_tasks_die_after_claiming(
        ray_session, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read task holding a duplicated content dies once right after claiming it; the retried tasks must
    still compute each content once and give every input exactly one row (the plain-Python oracle: one row
    per file, the file's sha256, and equal features for equal contents)."""
    import hashlib

    import ray.cloudpickle

    from cskd_ray.io import read_tasks as feature_tasks

    good = sorted(p for p in images.iterdir() if decode_image(p.read_bytes()).ok)
    for i in range(3):
        shutil.copy(good[i], images / f"dup-{i}")  # keys without an extension are inputs too
    duplicated = {str(p) for p in good[:3]} | {str(images / f"dup-{i}") for i in range(3)}
    marks = tmp_path / "attempts"
    marks.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrapper travels to the workers by value
    try:
        monkeypatch.setattr(feature_tasks, "read_decode_batch", _dies_once_after_claiming(marks, duplicated))
        out = str(tmp_path / "features")
        result = run_features(_cfg([str(images)], out))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert len(list(marks.iterdir())) >= 2, "tasks holding duplicated content died after claiming"
    assert result.new_rows == 67 and result.computed == 64 and result.errors == 4
    table = _table(out)
    oracle = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in images.iterdir()}
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) and set(uris) == set(oracle), "exactly one row per input"
    assert dict(zip(uris, table.column("sha256").to_pylist(), strict=True)) == oracle
    features = dict(zip(uris, table.column("feature").to_pylist(), strict=True))
    for i in range(3):
        assert features[str(images / f"dup-{i}")] == features[str(good[i])] is not None
    digests = table.filter(table.column("error").is_null()).column("sha256").to_pylist()
    assert len(digests) == 63 and len(set(digests)) == 60


@pytest.mark.s3
def test_s3_input_and_output_rerun_writes_nothing(ray_session, demo_data: Path, s3_bucket: str) -> None:
    upload_dir(demo_data / "images", f"{s3_bucket}/photos")
    out = f"{s3_bucket}/cache/features"
    result = run_features(_cfg([f"{s3_bucket}/photos/"], out))
    assert result.new_rows == 64 and result.errors == 4
    table = _table(out)
    assert all(u.startswith(f"{s3_bucket}/photos/") for u in table.column("uri").to_pylist())
    objects = sorted(e.uri for e in storage.list_files(s3_bucket))
    assert f"{out}/_meta.json" not in objects  # underscore files are metadata, never listed as inputs
    assert storage.exists(f"{out}/_meta.json")
    again = run_features(_cfg([f"{s3_bucket}/photos/"], out))
    assert again.new_rows == 0
    assert sorted(e.uri for e in storage.list_files(s3_bucket)) == objects
    shards = FeatureCache(out).shards()
    assert len(shards) == 1
    assert pq.read_metadata(pa.BufferReader(storage.read_bytes(shards[0]))).num_rows == 64


def test_cli_runs_and_reports(ray_session, images: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "features")
    status = main(["features", str(DEMO_CONFIG), "--input", str(images), "--output", out, "--set", "batch_size=16"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "64 images" in printed and "4 errors" in printed and f"cache at {out}" in printed
    assert "RANDOM" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "batchsize=3"], r"unknown key 'batchsize'.*did you mean 'batch_size'"),
        (["--set", "precision=fp8"], r"precision: .*'fp32'"),
        (["--set", "clip.name=ViT-B-33"], r"unknown CLIP model 'ViT-B-33'.*ViT-B-32"),
        (["--input", "/nonexistent/photos"], r"/nonexistent/photos"),
        (["--set", "clip.pretrained=openai"], r"no pretrained tag 'openai'.*random"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    base = ["features", str(DEMO_CONFIG), "--output", str(tmp_path / "out")]
    if "--input" not in args:
        base += ["--input", str(tmp_path)]
        (tmp_path / "a.jpg").write_bytes(b"x")
    status = main([*base, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert pytest.importorskip("re").search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()  # nothing was written before the error


def test_job_entry_point_rejects_bad_config_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [x]\noutput: y\nconcurency: 2\n")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "features.py"), str(bad)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "did you mean 'concurrency'" in proc.stderr and "Traceback" not in proc.stderr
