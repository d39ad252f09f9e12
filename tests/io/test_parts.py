"""Planning collections into parts: units indexed, parts cut across them, ids and pass-through columns, stable plans."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sample_collections import image_bytes, write_image_parquet, write_webdataset_tar

from cskd_ray.io import storage
from cskd_ray.io.parts import load_plan, plan_parts, read_part, source_kind
from cskd_ray.io.sources import SourceConfig, SourceError, expand_sources


def _collection(root: Path) -> tuple[Path, Path, Path]:
    """Two tars (7 and 3 samples), a Parquet file with 6 images and a CSV manifest of 4 files with ids."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    write_webdataset_tar(shards / "00000.tar", [(f"a{i}", ".jpg", image_bytes(i)) for i in range(7)])
    write_webdataset_tar(shards / "00001.tar", [(f"b{i}", ".jpg", image_bytes(10 + i)) for i in range(3)])
    hf = write_image_parquet(root / "train-00000.parquet", [image_bytes(20 + i) for i in range(6)])
    for i in range(4):
        (root / f"f{i}.jpg").write_bytes(image_bytes(30 + i))
    (root / "list.csv").write_text("path,key,caption\n" + "".join(f"f{i}.jpg,m{i},cap {i}\n" for i in range(4)))
    return shards, hf, root / "list.csv"


def _sources(*uris: object, **extra: object) -> list[SourceConfig]:
    return [SourceConfig(uri=str(u), **extra) for u in uris]


def test_parts_span_units_in_order_and_carry_ids_and_columns(tmp_path: Path) -> None:
    shards, hf, manifest = _collection(tmp_path / "in")
    (tmp_path / "in" / "list.csv").write_text("url,key,caption\n" + "".join(f"f{i}.jpg,m{i},cap {i}\n"
                                                                            for i in range(4)))
    sources = [SourceConfig(uri=str(shards), kind="webdataset"), *_sources(hf, manifest)]
    assert [source_kind(s) for s in sources] == ["webdataset", "image_parquet", "manifest"]
    out = str(tmp_path / "out")
    plan = plan_parts(sources, out, part_rows=4, id_column="key", columns=["caption", "likes"])
    assert plan.rows == 7 + 3 + 6 + 4 and len(plan.parts) == 5
    assert [plan.part_rows(p) for p in range(5)] == [4, 4, 4, 4, 4]
    assert plan.parts[1] == [(0, 4, 7), (1, 0, 1)]  # a part runs on into the next unit
    assert plan.schema.names == ["id", "key", "json", "txt", "caption", "likes"]
    rows = pa.concat_tables([read_part(plan, p) for p in range(5)])
    assert rows.column("id").to_pylist() == ([f"a{i}" for i in range(7)] + [f"b{i}" for i in range(3)]
                                            + [f"hf-{i:03d}" for i in range(6)] + [f"m{i}" for i in range(4)])
    assert rows.column("row").to_pylist() == [0, 1, 2, 3] * 5
    assert rows.column("uri")[0].as_py() == f"{shards}/00000.tar#a0.jpg"
    assert rows.column("uri")[10].as_py() == f"{hf}#0"
    assert rows.column("uri")[16].as_py() == str(tmp_path / "in" / "f0.jpg")  # resolved against the manifest
    assert rows.column("caption").to_pylist()[10:] == [f"hf photo {i}" for i in range(6)] + [f"cap {i}"
                                                                                             for i in range(4)]
    assert rows.column("caption").null_count == 10 and rows.column("likes").to_pylist()[10:16] == list(range(6))
    assert rows.column("txt")[0].as_py() == "photo a0" and rows.column("txt").null_count == 10
    # a rerun reuses the plan; other inputs are refused; the plan holds no rows of its own
    assert plan_parts(sources, out, part_rows=4, id_column="key", columns=["caption", "likes"]).parts == plan.parts
    assert load_plan(out).schema.equals(plan.schema)
    with pytest.raises(SourceError, match="planned for other inputs"):
        plan_parts(sources, out, part_rows=5, id_column="key", columns=["caption", "likes"])
    plan_text = storage.read_text(str(tmp_path / "out" / "_parts" / "plan.json"))
    assert '"a0"' not in plan_text and "photo a0" not in plan_text  # (the digest, hex, may hold a0)


def test_caps_errors_and_what_the_table_layout_refuses(tmp_path: Path) -> None:
    shards, hf, manifest = _collection(tmp_path / "in")
    plan = plan_parts([SourceConfig(uri=str(shards / "00000.tar"), max_images=5), *_sources(hf)],
                      str(tmp_path / "capped"), part_rows=3, max_images=8)
    assert [plan.part_rows(p) for p in range(len(plan.parts))] == [3, 3, 2]
    assert plan.parts[1] == [(0, 3, 5), (1, 0, 1)]
    with pytest.raises(SourceError, match="no id column 'nope'"):
        plan_parts(_sources(hf), str(tmp_path / "o1"), 4, id_column="nope")
    with pytest.raises(SourceError, match=r"columns \['nope'\]: in no input"):
        plan_parts(_sources(hf), str(tmp_path / "o2"), 4, columns=["nope"])
    with pytest.raises(ValueError, match="input.1.weight"):
        plan_parts([*_sources(hf), SourceConfig(uri=str(shards), kind="webdataset", weight=2)], str(tmp_path / "o3"), 4)
    with pytest.raises(SourceError, match="holds no .tar files"):  # a folder of loose images is no WebDataset
        loose = tmp_path / "loose"
        loose.mkdir()
        (loose / "f0.jpg").write_bytes(image_bytes(0))
        plan_parts([SourceConfig(uri=str(loose), kind="webdataset")], str(tmp_path / "o4"), 4)
    with pytest.raises(SourceError, match="read by the parts layout only"):
        expand_sources([SourceConfig(uri=str(shards), kind="webdataset")])
    (tmp_path / "bad.tar").write_bytes(b"x" * 700)
    with pytest.raises(SourceError, match="bad.tar: not a readable tar"):
        plan_parts(_sources(tmp_path / "bad.tar"), str(tmp_path / "o5"), 4)


def test_plan_on_s3_in_parallel_tasks(tmp_path: Path, s3_bucket: str, ray_session) -> None:
    shards, hf, _ = _collection(tmp_path / "in")
    for path in sorted(shards.iterdir()):
        storage.write_bytes_once(f"{s3_bucket}/wds/{path.name}", path.read_bytes())
    storage.write_bytes_once(f"{s3_bucket}/hf/{hf.name}", hf.read_bytes())
    for name in ("loose/a/1.jpg", "loose/a/2.jpg", "loose/b/3.jpg", "loose/0.jpg"):
        storage.write_bytes_once(f"{s3_bucket}/{name}", image_bytes(len(name)))
    sources = [SourceConfig(uri=f"{s3_bucket}/wds/*.tar"), SourceConfig(uri=f"{s3_bucket}/hf", kind="image_parquet")]
    plan = plan_parts(sources, f"{s3_bucket}/out", part_rows=10, id_column="key")
    assert plan.rows == 16 and len(plan.parts) == 2 and [u["kind"] for u in plan.units] == ["tar", "tar",
                                                                                           "image_parquet"]
    rows = read_part(plan, 1)
    assert rows.column("id").to_pylist() == [f"hf-{i:03d}" for i in range(6)]
    assert rows.column("container")[0].as_py() == f"{s3_bucket}/hf/{hf.name}"
    # an S3 prefix is listed one level deep (common prefixes), then each sub-prefix by its own task
    plan = plan_parts([SourceConfig(uri=f"{s3_bucket}/loose")], f"{s3_bucket}/out-loose", part_rows=10)
    assert [(u["kind"], u["uri"].rsplit("/", 1)[-1], u["rows"]) for u in plan.units] == [
        ("listing_top", "loose", 1), ("listing", "a", 2), ("listing", "b", 1)]
    assert read_part(plan, 0).column("uri").to_pylist() == [f"{s3_bucket}/loose/{n}"
                                                            for n in ("0.jpg", "a/1.jpg", "a/2.jpg", "b/3.jpg")]


def test_ids_keep_their_text_types_must_agree_and_changed_inputs_are_refused(tmp_path: Path) -> None:
    shards, hf, _ = _collection(tmp_path / "in")
    ids = tmp_path / "in" / "ids.csv"
    ids.write_text("uri,key,n\nf0.jpg,000123,7\nf1.jpg,000124,8\n")
    plan = plan_parts(_sources(ids), str(tmp_path / "o1"), 4, id_column="key", columns=["n"])
    assert read_part(plan, 0).column("id").to_pylist() == ["000123", "000124"]  # text: the zeros are kept
    with pytest.raises(SourceError, match=r"columns \['size'\]: these names are the output's own columns"):
        plan_parts(_sources(ids), str(tmp_path / "o2"), 4, columns=["size"])
    # a Parquet file whose own columns are named like the index's is planned (they are not passed through)
    odd = tmp_path / "in" / "odd.parquet"
    table = pq.read_table(hf).append_column("offset", pa.array(range(6))).append_column("n", pa.array(range(6)))
    pq.write_table(table.append_column("size", pa.array(["s"] * 6)), odd)
    assert plan_parts(_sources(odd), str(tmp_path / "o3"), 4, id_column="key").rows == 6
    with pytest.raises(SourceError, match=r"column 'n' has types that do not mix across inputs"):
        plan_parts(_sources(odd, ids), str(tmp_path / "o4"), 4, columns=["n"])
    # a WebDataset folder that gained a shard after planning is refused, not silently half-read
    sources = [SourceConfig(uri=str(shards), kind="webdataset")]
    plan_parts(sources, str(tmp_path / "o5"), 4)
    write_webdataset_tar(shards / "00002.tar", [("c0", ".jpg", image_bytes(99))])
    with pytest.raises(SourceError, match=r"changed since they were planned \(1 files added"):
        plan_parts(sources, str(tmp_path / "o5"), 4)


def test_a_folder_is_listed_one_level_deep_and_its_subfolders_as_units_of_their_own(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name in ("b/2.jpg", "b/deeper/3.jpg", "a/1.jpg", "top.jpg", "_tmp/x.jpg", ".hidden/y.jpg", "c/notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes(len(name)))
    (root / "empty").mkdir()
    plan = plan_parts([SourceConfig(uri=str(root), suffixes=[".jpg"])], str(tmp_path / "out"), 10)
    assert [(u["kind"], Path(u["uri"]).name, u["rows"]) for u in plan.units] == [
        ("listing_top", "photos", 1), ("listing", "a", 1), ("listing", "b", 2), ("listing", "c", 0),
        ("listing", "empty", 0)]
    uris = read_part(plan, 0).column("uri").to_pylist()
    assert uris == [str(root / n) for n in ("top.jpg", "a/1.jpg", "b/2.jpg", "b/deeper/3.jpg")]
    with pytest.raises(SourceError, match=r"holds no files ending with \['.png'\]"):
        plan_parts([SourceConfig(uri=str(root), suffixes=[".png"])], str(tmp_path / "none"), 10)
