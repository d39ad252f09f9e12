"""Tests for :mod:`cskd_ray.io.storage`: resolving, listing, reading and write-once on local disk and S3."""

from __future__ import annotations

import os
import re
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
from conftest import upload_dir

from cskd_ray.io import storage
from cskd_ray.io.storage import FileEntry, StorageError

# Names relative to the tree root; the hidden and marker files must never be listed.
TREE = {
    "a.jpg": b"aaa",
    "C.JPG": b"cc",
    "noext": b"n",
    "notes.txt": b"text",
    "sub/b.jpg": b"bbbb",
    "sub/b.png": b"png",
    "sub/deep/c.jpg": b"c",
    ".hidden": b"h",
    "_meta.json": b"{}",
    "_runs/r1/out.jpg": b"r",
    "sub/.cache/z.jpg": b"z",
    "sub/_SUCCESS": b"",
}
VISIBLE = ["C.JPG", "a.jpg", "noext", "notes.txt", "sub/b.jpg", "sub/b.png", "sub/deep/c.jpg"]


def _make_tree(root: Path) -> Path:
    for rel, data in TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _rel(entries, base: str) -> list[str]:
    base = base.rstrip("/") + "/"
    out = []
    for entry in entries:
        assert entry.uri.startswith(base), entry.uri
        out.append(entry.uri[len(base) :])
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _make_tree(tmp_path / "tree")


# ---------------------------------------------------------------- resolve


def test_resolve_absolute_local_path(tmp_path: Path) -> None:
    fs, path = storage.resolve(str(tmp_path / "x.jpg"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "x.jpg")


def test_resolve_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("photos/x.jpg")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "photos" / "x.jpg")


def test_resolve_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.resolve("~/data/x.jpg")[1] == str(tmp_path / "data" / "x.jpg")


def test_resolve_file_uri(tmp_path: Path) -> None:
    fs, path = storage.resolve(f"file://{tmp_path}/a/b.jpg")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/a/b.jpg"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/prefix/key.jpg", "bucket/prefix/key.jpg"),
        ("s3://bucket/prefix/", "bucket/prefix"),
        ("s3://bucket", "bucket"),
        ("s3a://bucket/k", "bucket/k"),
    ],
)
def test_resolve_s3(uri: str, expected: str) -> None:
    fs, path = storage.resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == expected


@pytest.mark.parametrize("uri", ["s3://", "s3:///key.jpg", "s3a:///x"])
def test_resolve_s3_without_bucket_is_an_error(uri: str) -> None:
    with pytest.raises(StorageError, match=r"needs a bucket, as in s3://bucket/prefix") as info:
        storage.resolve(uri)
    assert str(info.value).startswith(f"{uri}:")


@pytest.mark.parametrize(
    ("uri", "scheme"), [("gs://bucket/x", "gs"), ("http://host/a.jpg", "http"), ("hdfs://nn/p", "hdfs")]
)
def test_resolve_unsupported_scheme_names_it(uri: str, scheme: str) -> None:
    with pytest.raises(StorageError, match=rf"unsupported scheme '{scheme}'; use a local path or s3://"):
        storage.resolve(uri)


def test_storage_error_is_an_oserror() -> None:
    assert issubclass(StorageError, OSError)


@pytest.mark.parametrize(
    ("uri", "remote"),
    [("s3://b/k", True), ("s3a://b/k", True), ("/tmp/x", False), ("rel/x", False), ("file:///x", False)],
)
def test_is_remote(uri: str, remote: bool) -> None:
    assert storage.is_remote(uri) is remote


def test_join() -> None:
    assert storage.join("s3://b/p/", "x", "y.jpg") == "s3://b/p/x/y.jpg"
    assert storage.join("/data", "x", "y.jpg") == os.path.join("/data", "x", "y.jpg")


def test_s3_endpoint_prefers_service_specific_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert storage.s3_endpoint() == "http://s3-only:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.s3_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "")
    assert storage.s3_endpoint() == "http://generic:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.s3_endpoint() is None


# ---------------------------------------------------------------- list_files (local)


def test_list_dir_recursive_sorted_skips_hidden_and_markers(tree: Path) -> None:
    entries = list(storage.list_files(str(tree)))
    assert _rel(entries, str(tree)) == VISIBLE
    sizes = {rel: e.size for rel, e in zip(VISIBLE, entries, strict=True)}
    assert sizes == {rel: len(TREE[rel]) for rel in VISIBLE}
    assert all(isinstance(e, FileEntry) for e in entries)


def test_list_dir_with_trailing_slash_and_relative_path(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _rel(storage.list_files(str(tree) + "/"), str(tree)) == VISIBLE
    monkeypatch.chdir(tree.parent)
    assert _rel(storage.list_files("tree"), str(tree)) == VISIBLE


def test_list_file_uri(tree: Path) -> None:
    assert _rel(storage.list_files(f"file://{tree}"), str(tree)) == VISIBLE


def test_list_suffix_filter_is_case_insensitive(tree: Path) -> None:
    assert _rel(storage.list_files(str(tree), (".jpg",)), str(tree)) == [
        "C.JPG",
        "a.jpg",
        "sub/b.jpg",
        "sub/deep/c.jpg",
    ]
    assert _rel(storage.list_files(str(tree), (".JPG", ".Png")), str(tree)) == [
        "C.JPG",
        "a.jpg",
        "sub/b.jpg",
        "sub/b.png",
        "sub/deep/c.jpg",
    ]
    assert list(storage.list_files(str(tree), (".webp",))) == []


GLOB_TREE = {"top.jpg": b"t", "x/1.jpg": b"1", "y/2.jpg": b"22", "y/3.png": b"3", "y/_m/4.jpg": b"4"}


@pytest.fixture
def glob_tree(tmp_path: Path) -> Path:
    for rel, data in GLOB_TREE.items():
        (tmp_path / "g" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / rel).write_bytes(data)
    return tmp_path / "g"


def test_list_glob_one_level(glob_tree: Path) -> None:
    assert _rel(storage.list_files(f"{glob_tree}/*/*.jpg"), str(glob_tree)) == ["x/1.jpg", "y/2.jpg"]
    assert _rel(storage.list_files(f"{glob_tree}/y/*"), str(glob_tree)) == ["y/2.jpg", "y/3.png"]


def test_list_relative_glob(glob_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(glob_tree)
    assert _rel(storage.list_files("*/*.jpg"), str(glob_tree)) == ["x/1.jpg", "y/2.jpg"]


def test_list_glob_top_level_case_sensitive(tree: Path) -> None:
    assert _rel(storage.list_files(f"{tree}/*.JPG"), str(tree)) == ["C.JPG"]
    assert _rel(storage.list_files(f"{tree}/sub/b.[jp][pn]g"), str(tree)) == ["sub/b.jpg", "sub/b.png"]
    assert _rel(storage.list_files(f"{tree}/sub/?.png"), str(tree)) == ["sub/b.png"]


def test_list_glob_with_suffix_filter(tree: Path) -> None:
    assert _rel(storage.list_files(f"{tree}/sub/b.*", (".PNG",)), str(tree)) == ["sub/b.png"]


def test_list_glob_never_yields_hidden_or_marker_files(tree: Path) -> None:
    assert list(storage.list_files(f"{tree}/_*")) == []
    assert list(storage.list_files(f"{tree}/.*")) == []


def test_list_glob_star_does_not_cross_directories(tree: Path) -> None:
    assert _rel(storage.list_files(f"{tree}/*.jpg"), str(tree)) == ["a.jpg"]


def test_list_glob_one_level_excludes_deeper_files(tree: Path) -> None:
    assert _rel(storage.list_files(f"{tree}/*/*.jpg"), str(tree)) == ["sub/b.jpg"]


def test_list_glob_whose_base_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"no such file, directory or prefix"):
        list(storage.list_files(f"{tmp_path}/missing/*.jpg"))


def test_list_single_file(tree: Path) -> None:
    assert list(storage.list_files(str(tree / "sub" / "b.jpg"))) == [
        FileEntry(str(tree / "sub" / "b.jpg"), 4)
    ]


def test_list_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(
        StorageError, match=rf"^{re.escape(str(missing))}: no such file, directory or prefix$"
    ):
        list(storage.list_files(missing))


def test_exists_and_is_dir(tree: Path) -> None:
    assert storage.exists(str(tree)) and storage.is_dir(str(tree))
    assert storage.exists(str(tree / "a.jpg")) and not storage.is_dir(str(tree / "a.jpg"))
    assert not storage.exists(str(tree / "nope")) and not storage.is_dir(str(tree / "nope"))


# ---------------------------------------------------------------- read / write (local)


def test_read_bytes_and_text(tree: Path) -> None:
    assert storage.read_bytes(str(tree / "sub" / "b.jpg")) == b"bbbb"
    (tree / "u.txt").write_text("héllo", encoding="utf-8")
    assert storage.read_text(str(tree / "u.txt")) == "héllo"


def test_read_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(StorageError, match=rf"^{re.escape(str(missing))}: no such file$"):
        storage.read_bytes(missing)


def test_read_directory_is_a_storage_error(tree: Path) -> None:
    with pytest.raises(StorageError, match=re.escape(str(tree))):
        storage.read_bytes(str(tree))


def test_write_bytes_once_local(tmp_path: Path) -> None:
    target = tmp_path / "out" / "deeper" / "f.bin"
    assert storage.write_bytes_once(str(target), b"first") is True
    assert target.read_bytes() == b"first"
    assert storage.write_bytes_once(str(target), b"second") is False
    assert target.read_bytes() == b"first"
    assert storage.write_bytes_once(str(target), b"third", overwrite=True) is True
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # no temporary files left


def test_write_text_once_local(tmp_path: Path) -> None:
    target = str(tmp_path / "t.txt")
    assert storage.write_text_once(target, "ü") is True
    assert storage.write_text_once(target, "x") is False
    assert Path(target).read_text(encoding="utf-8") == "ü"


def test_write_once_leaves_no_temp_files_even_when_losing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    # exists() is checked first; simulate the race where the file appears between check and link
    monkeypatch.setattr(storage, "exists", lambda uri: False)
    assert storage.write_bytes_once(str(target), b"new") is False
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_makedirs_local(tmp_path: Path) -> None:
    storage.makedirs(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()


# ---------------------------------------------------------------- S3 (moto)


@pytest.mark.s3
def test_s3_endpoint_comes_from_environment(s3_server: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    assert storage.s3_endpoint() == s3_server


@pytest.mark.s3
def test_s3_list_prefix_glob_and_suffixes(s3_bucket: str, tree: Path) -> None:
    upload_dir(tree, f"{s3_bucket}/photos")
    base = f"{s3_bucket}/photos"
    assert _rel(storage.list_files(base), base) == VISIBLE
    assert _rel(storage.list_files(base + "/"), base) == VISIBLE
    assert all(e.uri.startswith("s3://") for e in storage.list_files(base))
    sizes = [e.size for e in storage.list_files(base)]
    assert sizes == [len(TREE[rel]) for rel in VISIBLE]
    assert _rel(storage.list_files(base, (".JPG",)), base) == [
        "C.JPG",
        "a.jpg",
        "sub/b.jpg",
        "sub/deep/c.jpg",
    ]
    assert _rel(storage.list_files(f"{base}/sub/deep/*.jpg"), base) == ["sub/deep/c.jpg"]
    assert _rel(storage.list_files(f"{base}/sub/b.*"), base) == ["sub/b.jpg", "sub/b.png"]
    assert _rel(storage.list_files(f"{base}/sub/b.*", (".png",)), base) == ["sub/b.png"]
    # the whole bucket, and a single object
    assert _rel(storage.list_files(s3_bucket), s3_bucket) == [f"photos/{rel}" for rel in VISIBLE]
    assert list(storage.list_files(f"{base}/sub/b.jpg")) == [FileEntry(f"{base}/sub/b.jpg", 4)]


@pytest.mark.s3
def test_s3_glob_one_level(s3_bucket: str, glob_tree: Path) -> None:
    upload_dir(glob_tree, f"{s3_bucket}/g")
    assert _rel(storage.list_files(f"{s3_bucket}/g/*/*.jpg"), f"{s3_bucket}/g") == ["x/1.jpg", "y/2.jpg"]
    assert _rel(storage.list_files(f"{s3_bucket}/g/*/*", (".PNG",)), f"{s3_bucket}/g") == ["y/3.png"]


@pytest.mark.s3
def test_s3_missing_prefix_is_an_error(s3_bucket: str) -> None:
    with pytest.raises(
        StorageError, match=rf"^{re.escape(str(s3_bucket))}/nothing: no such file, directory or prefix$"
    ):
        list(storage.list_files(f"{s3_bucket}/nothing"))
    with pytest.raises(StorageError, match=r"no such file, directory or prefix"):
        list(storage.list_files(f"{s3_bucket}/nothing/*.jpg"))


@pytest.mark.s3
def test_s3_read_bytes(s3_bucket: str) -> None:
    assert storage.write_bytes_once(f"{s3_bucket}/k/x.bin", b"\x00\x01payload") is True
    assert storage.read_bytes(f"{s3_bucket}/k/x.bin") == b"\x00\x01payload"
    assert storage.exists(f"{s3_bucket}/k/x.bin") and storage.is_dir(f"{s3_bucket}/k")


@pytest.mark.s3
def test_s3_read_missing_is_an_error(s3_bucket: str) -> None:
    with pytest.raises(StorageError, match=rf"^{re.escape(str(s3_bucket))}/missing.bin: "):
        storage.read_bytes(f"{s3_bucket}/missing.bin")


@pytest.mark.s3
def test_s3_write_bytes_once(s3_bucket: str, s3_server: str) -> None:
    uri = f"{s3_bucket}/out/f.bin"
    assert storage.write_bytes_once(uri, b"first") is True
    assert storage.write_bytes_once(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"
    assert storage.write_bytes_once(uri, b"third", overwrite=True) is True
    assert storage.read_bytes(uri) == b"third"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket[len("s3://") :])["Contents"]]
    assert keys == ["out/f.bin"]


@pytest.mark.s3
def test_s3_makedirs_is_a_noop(s3_bucket: str) -> None:
    storage.makedirs(f"{s3_bucket}/empty/prefix")
    assert not storage.exists(f"{s3_bucket}/empty/prefix")


@pytest.mark.s3
def test_s3_key_with_hash_round_trips(s3_bucket: str, s3_server: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket[len("s3://") :], Key="p/photo #1.jpg", Body=b"one")
    client.put_object(Bucket=s3_bucket[len("s3://") :], Key="p/photo", Body=b"other")
    [entry] = [e for e in storage.list_files(f"{s3_bucket}/p") if "#" in e.uri]
    assert entry.uri == f"{s3_bucket}/p/photo #1.jpg"
    assert storage.read_bytes(entry.uri) == b"one"
