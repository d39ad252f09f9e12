"""Tests for :mod:`cskd_ray.io.sources`: listing, manifests, caps, weighted sharing and interleaving."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import upload_dir

from cskd_ray.io.sources import (
    SourceConfig,
    SourceError,
    expand_sources,
    interleave,
    list_source,
    read_manifest,
    share_by_weight,
)


def _files(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    return root


def _numbered(root: Path, n: int, ext: str = ".jpg") -> list[str]:
    _files(root, [f"{i:04d}{ext}" for i in range(n)])
    return [str(root / f"{i:04d}{ext}") for i in range(n)]


def src(uri: str | Path, **kwargs) -> SourceConfig:
    return SourceConfig(uri=str(uri), **kwargs)


# ---------------------------------------------------------------- listing


def test_directory_source_lists_sorted_recursive(tmp_path: Path) -> None:
    _files(tmp_path / "d", ["b.jpg", "a.png", "sub/c.jpg", "noext", "_meta.json", ".hidden"])
    d = tmp_path / "d"
    expected = [str(d / n) for n in ["a.png", "b.jpg", "noext", "sub/c.jpg"]]
    assert list_source(src(d)) == expected
    assert expand_sources([src(d)]) == expected


def test_directory_source_suffixes(tmp_path: Path) -> None:
    _files(tmp_path / "d", ["b.JPG", "a.png", "c.jpg"])
    assert expand_sources([src(tmp_path / "d", suffixes=[".jpg"])]) == [
        str(tmp_path / "d" / "b.JPG"),
        str(tmp_path / "d" / "c.jpg"),
    ]


def test_glob_source(tmp_path: Path) -> None:
    _files(tmp_path / "d", ["x/1.jpg", "x/2.png", "y/3.jpg", "top.jpg"])
    assert expand_sources([src(f"{tmp_path}/d/*/*.jpg")]) == [
        str(tmp_path / "d/x/1.jpg"),
        str(tmp_path / "d/y/3.jpg"),
    ]


def test_glob_ending_in_csv_is_listed_not_read_as_manifest(tmp_path: Path) -> None:
    _files(tmp_path / "d", ["a.csv", "b.csv"])
    assert expand_sources([src(f"{tmp_path}/d/*.csv")]) == [
        str(tmp_path / "d/a.csv"),
        str(tmp_path / "d/b.csv"),
    ]


def test_empty_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=rf"^input {re.escape(str(tmp_path))}/empty: holds no files$"):
        expand_sources([src(tmp_path / "empty")])


def test_no_file_with_suffix_is_an_error_naming_suffixes(tmp_path: Path) -> None:
    _files(tmp_path / "d", ["a.png"])
    with pytest.raises(SourceError, match=r"holds no files ending with \['\.jpg'\]"):
        expand_sources([src(tmp_path / "d", suffixes=[".jpg"])])


def test_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = f"{tmp_path}/missing"
    m = re.escape(missing)
    with pytest.raises(SourceError, match=rf"^input {m}: {m}: no such file, directory or prefix$"):
        expand_sources([src(missing)])


def test_no_sources_is_an_error() -> None:
    with pytest.raises(SourceError, match="no input sources given"):
        expand_sources([])


def test_source_error_is_a_value_error() -> None:
    assert issubclass(SourceError, ValueError)


# ---------------------------------------------------------------- manifests


def test_csv_manifest_relative_and_absolute(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "manifest.csv").write_text(
        "uri,label\nimgs/a.jpg,1\n/abs/b.jpg,2\ns3://bkt/c.jpg,3\n  ,4\nfile:///x/d.jpg,5\n"
    )
    assert read_manifest(str(folder / "manifest.csv")) == [
        os.path.join(str(folder), "imgs/a.jpg"),
        "/abs/b.jpg",
        "s3://bkt/c.jpg",
        "file:///x/d.jpg",
    ]
    # the listing keeps manifest order (no sorting)
    assert expand_sources([src(folder / "manifest.csv")]) == [
        os.path.join(str(folder), "imgs/a.jpg"),
        "/abs/b.jpg",
        "s3://bkt/c.jpg",
        "file:///x/d.jpg",
    ]


def test_relative_manifest_path_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "manifest.csv").write_text("uri\nz.jpg\na.jpg\n")
    monkeypatch.chdir(tmp_path)
    assert read_manifest("manifest.csv") == ["./z.jpg", "./a.jpg"]


@pytest.mark.parametrize("suffix", [".parquet", ".pq"])
def test_parquet_manifest(tmp_path: Path, suffix: str) -> None:
    table = pa.table({"id": [1, 2, 3], "uri": ["x/1.jpg", None, "/abs/3.png"]})
    pq.write_table(table, tmp_path / f"m{suffix}")
    assert expand_sources([src(tmp_path / f"m{suffix}")]) == [str(tmp_path / "x/1.jpg"), "/abs/3.png"]


def test_manifest_suffix_filter(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("uri\na.JPG\nb.png\nc.jpg\n")
    assert expand_sources([src(tmp_path / "m.csv", suffixes=[".jpg"])]) == [
        str(tmp_path / "a.JPG"),
        str(tmp_path / "c.jpg"),
    ]


def test_manifest_kind_forces_reading(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("uri\na.jpg\n")
    pq.write_table(pa.table({"uri": ["p.jpg"]}), tmp_path / "list.data")
    assert expand_sources([src(tmp_path / "list.data", kind="manifest")]) == [str(tmp_path / "p.jpg")]
    # kind=listing takes a .csv file as a single input
    assert expand_sources([src(tmp_path / "list.txt", kind="listing")]) == [str(tmp_path / "list.txt")]
    (tmp_path / "m.csv").write_text("uri\na.jpg\n")
    assert expand_sources([src(tmp_path / "m.csv", kind="listing")]) == [str(tmp_path / "m.csv")]


def test_manifest_without_uri_column_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("path,label\na.jpg,1\n")
    with pytest.raises(
        SourceError,
        match=rf"^manifest {re.escape(str(path))}: needs a 'uri' \(or 'url'\) column; found \['path', 'label'\]$",
    ):
        expand_sources([src(path)])


def test_missing_manifest_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(SourceError, match=rf"^manifest {re.escape(str(path))}: .*no such file"):
        expand_sources([src(path)])


def test_unreadable_parquet_manifest_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(SourceError, match=rf"^manifest {re.escape(str(path))}: not a readable Parquet file"):
        expand_sources([src(path)])


def test_empty_manifest_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("uri\n\n")
    with pytest.raises(SourceError, match=rf"^input {re.escape(str(path))}: holds no files$"):
        expand_sources([src(path)])


@pytest.mark.s3
def test_s3_prefix_and_manifest(s3_bucket: str, tmp_path: Path) -> None:
    _files(tmp_path / "up", ["imgs/a.jpg", "imgs/b.jpg", "imgs/sub/c.png"])
    (tmp_path / "up" / "manifest.csv").write_text("uri\nimgs/b.jpg\ns3://other/x.jpg\n")
    upload_dir(tmp_path / "up", f"{s3_bucket}/data")
    assert expand_sources([src(f"{s3_bucket}/data/imgs/")]) == [
        f"{s3_bucket}/data/imgs/a.jpg",
        f"{s3_bucket}/data/imgs/b.jpg",
        f"{s3_bucket}/data/imgs/sub/c.png",
    ]
    assert expand_sources([src(f"{s3_bucket}/data/manifest.csv")]) == [
        f"{s3_bucket}/data/imgs/b.jpg",
        "s3://other/x.jpg",
    ]
    assert expand_sources([src(f"{s3_bucket}/data/imgs/*.jpg")]) == [
        f"{s3_bucket}/data/imgs/a.jpg",
        f"{s3_bucket}/data/imgs/b.jpg",
    ]


# ---------------------------------------------------------------- caps


def test_per_source_cap_is_a_seeded_sample_in_listing_order(tmp_path: Path) -> None:
    files = _numbered(tmp_path / "d", 50)
    a = expand_sources([src(tmp_path / "d", max_images=10)], seed=1)
    assert len(a) == 10 and set(a) <= set(files)
    assert a == sorted(a)  # listing order kept
    assert expand_sources([src(tmp_path / "d", max_images=10)], seed=1) == a
    others = {tuple(expand_sources([src(tmp_path / "d", max_images=10)], seed=s)) for s in range(2, 6)}
    assert any(o != tuple(a) for o in others)
    assert a != files[:10]  # a sample, not the head of the listing (C(50,10) ways)


def test_per_source_cap_larger_than_source_keeps_all(tmp_path: Path) -> None:
    files = _numbered(tmp_path / "d", 5)
    assert expand_sources([src(tmp_path / "d", max_images=100)]) == files


def test_global_cap_shared_by_weight(tmp_path: Path) -> None:
    a = _numbered(tmp_path / "a", 100)
    b = _numbered(tmp_path / "b", 100)
    out = expand_sources([src(tmp_path / "a", weight=3), src(tmp_path / "b", weight=1)], max_images=40)
    assert len(out) == 40
    assert sum(u in set(a) for u in out) == 30
    assert sum(u in set(b) for u in out) == 10


def test_global_cap_small_source_hands_on_its_share(tmp_path: Path) -> None:
    a = _numbered(tmp_path / "a", 5)
    b = _numbered(tmp_path / "b", 100)
    out = expand_sources([src(tmp_path / "a"), src(tmp_path / "b")], max_images=40)
    assert len(out) == 40
    assert set(a) <= set(out)
    assert sum(u in set(b) for u in out) == 35


def test_global_cap_after_per_source_cap(tmp_path: Path) -> None:
    _numbered(tmp_path / "a", 100)
    b = _numbered(tmp_path / "b", 100)
    out = expand_sources([src(tmp_path / "a", max_images=4), src(tmp_path / "b")], max_images=20)
    assert len(out) == 20
    assert sum(u in set(b) for u in out) == 16


def test_global_cap_larger_than_everything_keeps_everything(tmp_path: Path) -> None:
    a = _numbered(tmp_path / "a", 3)
    b = _numbered(tmp_path / "b", 4)
    out = expand_sources([src(tmp_path / "a"), src(tmp_path / "b", weight=5)], max_images=1000)
    assert sorted(out) == sorted(a + b)


def test_expand_sources_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    _numbered(tmp_path / "a", 60)
    _numbered(tmp_path / "b", 60)
    sources = [src(tmp_path / "a", weight=2, max_images=30), src(tmp_path / "b")]
    first = expand_sources(sources, max_images=25, seed=7)
    assert expand_sources(sources, max_images=25, seed=7) == first
    assert len(first) == 25
    assert expand_sources(sources, max_images=25, seed=8) != first


# ---------------------------------------------------------------- mixing


def test_interleave_proportions_in_every_prefix(tmp_path: Path) -> None:
    a = _numbered(tmp_path / "a", 100)
    b = _numbered(tmp_path / "b", 100)
    out = expand_sources([src(tmp_path / "a", weight=3), src(tmp_path / "b", weight=1)], max_images=80)
    assert len(out) == 80 and sum(u in set(b) for u in out) == 20
    set_a = set(a)
    for start in range(0, len(out) - 20 + 1):
        window = out[start : start + 20]
        n_a = sum(u in set_a for u in window)
        assert 14 <= n_a <= 16, (start, n_a)
    assert sum(u in set_a for u in out[:20]) == 15
    # within a source, listing order is kept
    assert [u for u in out if u in set_a] == sorted(u for u in out if u in set_a)
    assert [u for u in out if u not in set_a] == sorted(u for u in out if u not in set_a)


def test_interleave_smooth_round_robin() -> None:
    assert interleave([list("AAAAAA"), list("bb")], [3, 1]) == list("AAbAAAbA")
    assert interleave([list("AAA"), list("bbb")], [1, 1]) == list("AbAbAb")
    assert interleave([list("AB"), [], list("xyz")], [1, 5, 1]) == list("AxByz")
    assert interleave([], []) == []


def test_duplicate_uris_across_sources_kept_once(tmp_path: Path) -> None:
    files = _numbered(tmp_path / "d", 6)
    (tmp_path / "m.csv").write_text("uri\n" + "\n".join(files[:3] + [str(tmp_path / "extra.jpg")]) + "\n")
    out = expand_sources([src(tmp_path / "d"), src(tmp_path / "m.csv"), src(tmp_path / "d")])
    assert sorted(out) == sorted(files + [str(tmp_path / "extra.jpg")])
    assert len(out) == len(set(out))


# ---------------------------------------------------------------- share_by_weight


@pytest.mark.parametrize(
    ("total", "weights", "available", "expected"),
    [
        (40, [3, 1], [100, 100], [30, 10]),
        (40, [1, 1], [5, 100], [5, 35]),
        (40, [3, 1], [5, 100], [5, 35]),
        (10, [1, 1, 1], [100, 100, 100], [4, 3, 3]),  # largest remainders, ties by order
        (10, [0.1, 0.2, 0.7], [100, 100, 100], [1, 2, 7]),
        (1000, [1, 2], [3, 4], [3, 4]),  # more than available: everything
        (0, [1, 2], [3, 4], [0, 0]),
        (10, [1, 2], [0, 0], [0, 0]),
        (7, [1, 1, 1], [0, 2, 100], [0, 2, 5]),
        (2, [1, 1, 1], [9, 9, 9], [1, 1, 0]),
        (100, [1, 1, 2], [10, 30, 100], [10, 30, 60]),
    ],
)
def test_share_by_weight(total: int, weights: list[float], available: list[int], expected: list[int]) -> None:
    counts = share_by_weight(total, weights, available)
    assert counts == expected
    assert sum(counts) == min(total, sum(available))
    assert all(c <= a for c, a in zip(counts, available, strict=True))
