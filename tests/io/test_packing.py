"""Packed training images (cskd_ray.io.packing) and the footer-only row count of a result table; no Ray."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import FeatureCache, feature_schema
from cskd_ray.io.packing import pack_image
from cskd_ray.io.read_tasks import decode_rows
from cskd_ray.io.transforms import PreprocessSpec, resize_crop
from cskd_ray.train.ingest import decode_for_training

SPEC = PreprocessSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    sink = io.BytesIO()
    Image.fromarray(pixels).save(sink, format="JPEG", quality=95)
    return sink.getvalue()


def test_an_image_no_larger_than_the_pack_size_is_kept_as_its_original_bytes() -> None:
    original = _jpeg(48, 40)
    assert pack_image(original, decode_image(original).image, 40) is original
    assert pack_image(original, decode_image(original).image, 256) is original


def test_a_larger_image_is_resized_to_the_pack_size_keeping_its_aspect_and_stays_close_to_the_original() -> None:
    original = _jpeg(300, 200)
    packed = pack_image(original, decode_image(original).image, 64)
    image = Image.open(io.BytesIO(packed))
    assert image.format == "JPEG" and image.size == (96, 64) and len(packed) < len(original)
    # what training sees from the packed copy is the same crop as from the original, up to resampling
    from_original = resize_crop(decode_image(original).image, SPEC).astype(np.float32)
    from_packed = resize_crop(decode_image(packed).image, SPEC).astype(np.float32)
    assert np.abs(from_original - from_packed).mean() < 6.0


def test_decode_rows_packs_the_rows_it_decodes_and_only_those() -> None:
    contents = [_jpeg(120, 80, 1), _jpeg(120, 80, 2), b"not an image", _jpeg(20, 30, 3)]
    errors, packed = [""] * 4, [b""] * 4
    pixels = decode_rows(contents, [0, 2, 3], errors, SPEC, 10**8, packed, pack_size=40)
    assert pixels.shape == (4, 32, 32, 3)
    assert Image.open(io.BytesIO(packed[0])).size == (60, 40)
    assert packed[1] == b""  # not decoded here (deferred to another row)
    assert packed[2] == b"" and errors[2].startswith("not an image")
    assert packed[3] == contents[3]  # already small: its original bytes


def test_training_decodes_a_packed_row_without_reading_its_uri(tmp_path: Path) -> None:
    present = tmp_path / "present.jpg"
    present.write_bytes(_jpeg(64, 64, 4))
    packed = _jpeg(64, 64, 5)
    uris = [str(tmp_path / "deleted.jpg"), str(present), str(tmp_path / "also-deleted.jpg")]
    pixels, valid = decode_for_training(uris, SPEC, 10**8, [packed, None, None])
    assert valid.tolist() == [1, 1, 0]  # packed; read from its uri; neither (the loss skips it)
    np.testing.assert_array_equal(pixels[0], resize_crop(decode_image(packed, draft_size=32).image, SPEC))


def _rows(n: int, errors: int, offset: int) -> pa.Table:
    error = [("corrupt" if i < errors else None) for i in range(n)]
    return pa.table({"uri": [f"u{offset + i}" for i in range(n)], "sha256": [f"d{offset + i}" for i in range(n)],
                     "feature": pa.array([None if e else [0.5, 1.0] for e in error], pa.large_list(pa.float16())),
                     "error": pa.array(error, pa.string())}, schema=feature_schema())


def test_row_counts_come_from_the_shards_footers_and_match_a_scan(tmp_path: Path) -> None:
    cache = FeatureCache(str(tmp_path / "cache"))
    cache.write_shard(_rows(10, 3, 0))
    cache.write_shard(_rows(7, 0, 10))
    # a shard written without statistics (another writer): its error column is read instead
    pq.write_table(_rows(5, 2, 17), tmp_path / "cache" / "part-0-nostats.parquet", write_statistics=False,
                   row_group_size=2)
    scanned = cache.read(["error"]).column("error")
    assert cache.count_rows() == (len(scanned), scanned.null_count) == (22, 17)


@pytest.mark.parametrize("pack_size", [0, 64])
def test_a_feature_cache_schema_has_an_image_column_only_when_packed(pack_size: int) -> None:
    names = FeatureCache("unused", packed=pack_size > 0).schema.names
    expected = ["uri", "sha256", "feature", "image", "error"] if pack_size else ["uri", "sha256", "feature", "error"]
    assert names == expected
