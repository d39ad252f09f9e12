"""WebDataset tars and Parquet files with image bytes: indexing and reading members, locally and on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sample_collections import image_bytes, write_image_parquet, write_webdataset_tar

from cskd_ray.io import containers, storage
from cskd_ray.io.containers import ContainerError, index_image_parquet, index_tar, read_parquet_images, read_ranges


def _samples() -> list[tuple[str, str, bytes]]:
    return [(f"00000/{i:09d}", ".png" if i == 2 else ".jpg", image_bytes(i)) for i in range(5)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tar_index_keeps_every_image_and_its_sidecars_and_ranges_read_the_members(
        tmp_path: Path, where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _samples()
    local = write_webdataset_tar(tmp_path / "shard-00000.tar", samples)
    uri = str(local)
    if where == "s3":
        uri = storage.join(request.getfixturevalue("s3_bucket"), "wds/shard-00000.tar")
        storage.write_bytes_once(uri, local.read_bytes())
    index = index_tar(uri)
    assert index.column("key").to_pylist() == [k for k, _, _ in samples]
    assert index.column("member").to_pylist() == [k + e for k, e, _ in samples]
    assert json.loads(index.column("json")[1].as_py())["caption"] == "photo 00000/000000001"
    assert index.column("txt").to_pylist() == [f"photo {k}" for k, _, _ in samples]
    ranges = list(zip(index.column("offset").to_pylist(), index.column("size").to_pylist(), strict=True))
    order = [3, 0, 4, 1, 2]
    assert read_ranges(uri, [ranges[i] for i in order]) == [samples[i][2] for i in order]
    monkeypatch.setattr(containers, "COALESCE_GAP", 0)  # one request per member: the same bytes
    assert read_ranges(uri, ranges) == [data for _, _, data in samples]


def test_tar_without_sidecars_and_broken_tars(tmp_path: Path) -> None:
    bare = write_webdataset_tar(tmp_path / "bare.tar", _samples()[:2], sidecars=False)
    index = index_tar(str(bare))
    assert len(index) == 2 and index.column("json").null_count == 2 and index.column("txt").null_count == 2
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ContainerError, match="junk.tar: not a readable tar"):
        index_tar(str(tmp_path / "junk.tar"))
    with pytest.raises(ContainerError, match="no such tar"):
        index_tar(str(tmp_path / "missing.tar"))
    with pytest.raises(storage.StorageError, match="ends at"):  # a range past the end of the object
        read_ranges(str(bare), [(10, 1 << 30)])


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_image_column_rows_are_read_by_row_group(tmp_path: Path, struct: bool) -> None:
    images = [image_bytes(i) for i in range(9)]
    images[5] = None
    path = write_image_parquet(tmp_path / "train-00000.parquet", images, struct=struct, row_group_size=4)
    index = index_image_parquet(str(path))
    column = index.image_column
    assert column == ("image" if struct else "jpg") and index.rows == 9
    assert index.columns["key"].to_pylist() == [f"hf-{i:03d}" for i in range(9)]
    assert index.columns["likes"].to_pylist() == list(range(9)) and column not in index.columns
    assert index.paths[0] == ("hf-000.jpg" if struct else None)
    assert list(index_image_parquet(str(path), columns=["caption"]).columns) == ["caption"]  # only what is asked
    rows = [8, 0, 5, 4, 3]
    assert read_parquet_images(str(path), column, rows) == [images[r] for r in rows]
    cache: dict = {}  # consecutive reads of one row group read it once
    assert read_parquet_images(str(path), column, [4, 5], cache) == images[4:6]
    assert list(cache) == [(str(path), column, 1)]
    assert read_parquet_images(str(path), column, [6, 8], cache) == [images[6], images[8]]
    assert list(cache) == [(str(path), column, 2)]


def test_parquet_without_image_column_names_its_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"uri": ["a.jpg"], "score": [1.0]}), tmp_path / "m.parquet")
    with pytest.raises(ContainerError, match=r"no image column .*columns: \['uri \(string\)', 'score \(double\)'\]"):
        index_image_parquet(str(tmp_path / "m.parquet"))
    path = write_image_parquet(tmp_path / "x.parquet", [image_bytes(0)])
    with pytest.raises(ContainerError, match="image column 'caption': not a binary column"):
        index_image_parquet(str(path), "caption")
