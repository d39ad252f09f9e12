"""Scoring in the parts layout: WebDataset tars, Parquet with image bytes and URL lists, with the user's ids, and a
rerun that redoes exactly the parts without a commit marker."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sample_collections import image_bytes, write_image_parquet, write_webdataset_tar
from test_score import write_model_folder

from cskd_ray.app.commands import run_score_command
from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.part_pass import commit_part, committed_parts, read_marker
from cskd_ray.io.parts import load_plan
from cskd_ray.io.transforms import normalize_batch, resize_crop
from cskd_ray.models.saved import load_scoring_model
from cskd_ray.stages.score import merge_summaries, summarize_table


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1: ``(folder, base URL)``."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _expected_scores(model_dir: Path, images: list[bytes]) -> np.ndarray:
    scorer = load_scoring_model(str(model_dir))
    pixels = np.stack([resize_crop(decode_image(b).image, scorer.preprocess) for b in images])
    return scorer.predict(normalize_batch(pixels, scorer.preprocess))[0].numpy()


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("part", "ascending"), ("row", "ascending")])


@pytest.mark.ray
def test_tars_parquet_and_urls_keep_ids_and_a_rerun_redoes_only_uncommitted_parts(
        ray_session, s3_bucket: str, http_folder: tuple[Path, str], tmp_path: Path) -> None:
    model_dir = write_model_folder(tmp_path / "model")
    tar_images = [image_bytes(i) for i in range(10)]
    tar_images[5] = tar_images[0]  # the same content twice in one part, in another chunk and batch: computed once
    tar_images[3] = b"\xff\xd8 not really a jpeg"
    tar = write_webdataset_tar(tmp_path / "00000.tar", [(f"t{i}", ".jpg", b) for i, b in enumerate(tar_images)])
    hf_images: list[bytes | None] = [image_bytes(20 + i) for i in range(6)]
    hf_images[2] = None
    hf = write_image_parquet(tmp_path / "train-00000.parquet", hf_images)
    hf_uri = f"{s3_bucket}/hf/train-00000.parquet"
    storage.write_bytes_once(hf_uri, hf.read_bytes())
    www, base = http_folder
    for i in range(3):
        (www / f"u{i}.jpg").write_bytes(image_bytes(40 + i))
    urls = tmp_path / "urls.csv"
    urls.write_text("url,key,caption\n" + "".join(f"{base}/u{i}.jpg,u{i},url {i}\n" for i in range(3))
                    + f"{base}/missing.jpg,u3,url 3\n")
    out = str(tmp_path / "scores")
    overrides = ["batch_size=8", "decode_batch_size=4", "part_rows=6", "id_column=key", "columns=[caption]",
                 "min_score=5.0"]
    lines: list[str] = []
    summary = run_score_command(str(model_dir), [str(tar), hf_uri, str(urls)], out, None, overrides,
                                printer=lines.append)
    assert summary["run"]["new_rows"] == 20 and summary["run"]["already_done"] == 0 and summary["run"]["reused"] == 1
    first = _sorted(ResultTable(out, LABEL_SCHEMA).read())
    assert first.column_names == [*LABEL_SCHEMA.names, "part", "row", "id", "key", "json", "txt", "caption"]
    ids = [f"t{i}" for i in range(10)] + [f"hf-{i:03d}" for i in range(6)] + [f"u{i}" for i in range(4)]
    assert first.column("id").to_pylist() == ids and len(set(first.column("uri").to_pylist())) == 20
    assert first.column("caption").to_pylist()[10:] == [f"hf photo {i}" for i in range(6)] + [f"url {i}"
                                                                                             for i in range(4)]
    assert first.column("txt")[1].as_py() == "photo t1"
    errors = dict(zip(first.column("id").to_pylist(), first.column("error").to_pylist(), strict=True))
    assert errors["t3"].startswith(("not an image", "corrupt image", "truncated image"))
    assert errors["hf-002"] == "read error: no image bytes (null)"
    assert errors["u3"].startswith("read error:") and "404" in errors["u3"]
    assert sum(e is not None for e in errors.values()) == 3
    scores = dict(zip(first.column("id").to_pylist(), first.column("score").to_pylist(), strict=True))
    np.testing.assert_allclose([scores["t1"], scores["hf-004"], scores["u2"]],
                               _expected_scores(model_dir, [tar_images[1], hf_images[4], image_bytes(42)]), rtol=1e-4)
    assert scores["t5"] == scores["t0"] and first.column("sha256")[5] == first.column("sha256")[0]
    markers = [read_marker(out, p) for p in sorted(committed_parts(out))]
    assert [m["part"] for m in markers] == [0, 1, 2, 3] and sum(m["rows"] for m in markers) == 20
    assert sum(m["deduplicated"] for m in markers) == 1 and sum(m["errors"] for m in markers) == 3
    assert not list(Path(out, "_attempts").rglob("*.parquet"))  # committed attempts are cleaned up
    # a commit retried after its first attempt wrote the marker (and deleted the attempt's files) returns it
    assert commit_part(out, load_plan(out), 0, [], LABEL_SCHEMA) == markers[0]
    # the summary is merged from the markers' per-part summaries: the same as summarising every row
    table_summary = summarize_table(first, {"kind": "distribution", "bins": 10})
    assert summary["table"]["score"] == pytest.approx(table_summary.pop("score"))
    assert {k: v for k, v in summary["table"].items() if k != "score"} == table_summary
    manifest = list(csv.DictReader(io.StringIO(Path(summary["manifest"]).read_text())))
    expected = first.filter(pc.fill_null(pc.greater_equal(first.column("score"), 5.0), False))
    assert [(r["uri"], r["id"]) for r in manifest] == list(zip(expected.column("uri").to_pylist(),
                                                                expected.column("id").to_pylist(), strict=True))
    assert summary["manifest_rows"] == len(manifest) > 0

    # A crash: part 1 lost its marker and file, part 2 its marker only (killed between the two); a dead
    # attempt left a file behind. The rerun redoes exactly parts 1 and 2, and never reads the dead attempt.
    Path(out, "_commits", "part-000001.json").unlink()
    Path(out, "part-000001.parquet").unlink()
    Path(out, "_commits", "part-000002.json").unlink()
    dead = Path(out, "_attempts", "part-000001", "dead-attempt.parquet")
    dead.parent.mkdir(parents=True, exist_ok=True)
    dead.write_bytes(b"PAR1 half a file")
    summary = run_score_command(str(model_dir), [str(tar), hf_uri, str(urls)], out, None, overrides,
                                printer=lines.append)
    assert summary["run"]["new_rows"] == 12 and summary["run"]["already_done"] == 8
    again = _sorted(ResultTable(out, LABEL_SCHEMA).read())
    for name in again.column_names:
        if name != "score":
            assert again.column(name).equals(first.column(name)), name
    assert sorted(committed_parts(out)) == [0, 1, 2, 3] and dead.exists()
    summary = run_score_command(str(model_dir), [str(tar), hf_uri, str(urls)], out, None, overrides,
                                printer=lines.append)
    assert summary["run"]["new_rows"] == 0 and summary["table"]["rows"] == 20
    assert any("4 parts, 4 parts committed, 0 to do" in line for line in lines), lines
    print("\n".join(lines))

    # layouts never mix in one output; the table layout cannot read containers
    with pytest.raises(ConfigError, match="written in the parts layout"):
        run_score_command(str(model_dir), [str(www)], out, None, ["layout=table"], printer=lines.append)
    with pytest.raises(ConfigError, match=r"columns \['score'\]: these names are the output's own columns"):
        run_score_command(str(model_dir), [str(urls)], str(tmp_path / "c"), None, ["columns=[score]"],
                          printer=lines.append)
    with pytest.raises(ConfigError, match="layout: table cannot read WebDataset"):
        run_score_command(str(model_dir), [str(tar)], str(tmp_path / "t"), None, ["layout=table"],
                          printer=lines.append)
    assert pc.sum(pc.is_valid(again.column("score"))).as_py() == 17


def test_merged_summaries_equal_the_summary_of_the_whole_table() -> None:
    rng = np.random.default_rng(0)
    scores = [None if i % 7 == 0 else float(rng.uniform(0, 11)) for i in range(50)]
    errors = [("read error: x" if i % 14 == 0 else "not an image: y") if s is None else None
              for i, s in enumerate(scores)]
    table = pa.table({"score": pa.array(scores, pa.float64()), "error": pa.array(errors, pa.string())})
    head = {"kind": "distribution", "bins": 10}
    parts = [summarize_table(table.slice(lo, 12), head) for lo in range(0, 50, 12)]
    merged, whole = merge_summaries(parts, head), summarize_table(table, head)
    assert merged["score"] == pytest.approx(whole.pop("score"))
    assert {k: v for k, v in merged.items() if k != "score"} == whole
    assert merge_summaries([], head)["rows"] == 0


@pytest.mark.ray
def test_duplicate_content_across_parts_and_runs_is_computed_once(ray_session, tmp_path: Path) -> None:
    """20% of the inputs repeat a content of another part (one of them corrupt); checked against a plain oracle."""
    model_dir = write_model_folder(tmp_path / "model")
    distinct = [image_bytes(100 + i) for i in range(23)] + [b"\xff\xd8 corrupt"]
    members = list(distinct)
    for position, source in [(3, 0), (8, 1), (13, 9), (20, 23), (26, 14), (29, 2)]:
        members.insert(position, distinct[source])  # within part 0, and from earlier and later parts
    tars = [write_webdataset_tar(tmp_path / f"{s:05d}.tar", [(f"k{i:02d}", ".jpg", members[i])
                                                            for i in range(15 * s, 15 * s + 15)]) for s in range(2)]
    out = str(tmp_path / "scores")
    overrides = ["batch_size=4", "decode_batch_size=4", "part_rows=6", "content_shards=2"]
    lines: list[str] = []
    run_score_command(str(model_dir), [str(t) for t in tars], out, None, overrides, printer=lines.append)

    # the oracle: one row per member, its content's score (or error), each content computed once
    digest = [hashlib.sha256(m).hexdigest() for m in members]
    expected = dict(zip(distinct[:23], _expected_scores(model_dir, distinct[:23]), strict=True))
    first = _sorted(ResultTable(out, LABEL_SCHEMA).read())
    assert first.column("key").to_pylist() == [f"k{i:02d}" for i in range(30)]
    assert first.column("sha256").to_pylist() == digest
    scores = first.column("score").to_pylist()
    np.testing.assert_allclose([scores[i] for i in range(30) if members[i] in expected],
                               [expected[m] for m in members if m in expected], rtol=1e-4)
    errors = first.column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [i for i, m in enumerate(members) if m == distinct[23]]
    markers = {p: read_marker(out, p) for p in sorted(committed_parts(out))}
    assert len(markers) == 5 and sum(m["computed"] for m in markers.values()) == len(set(digest)) == 24
    assert sum(m["from_other_parts"] for m in markers.values()) >= 4  # 5 of the 6 repeats are in other parts

    # a crash lost parts 1 and 3 (part 3's digests file was written before the crash): the rerun computes only
    # the contents of those parts that no committed part has
    for p in (1, 3):
        Path(out, "_commits", f"part-{p:06d}.json").unlink()
        Path(out, f"part-{p:06d}.parquet").unlink()
    Path(out, "_digests", "part-000001.parquet").unlink()
    run_score_command(str(model_dir), [str(t) for t in tars], out, None, overrides, printer=lines.append)
    redone = {p: read_marker(out, p) for p in (1, 3)}
    kept = {digest[i] for i in range(30) if i // 6 not in (1, 3)}
    lost = {digest[i] for i in range(30) if i // 6 in (1, 3)}
    assert sum(m["computed"] for m in redone.values()) == len(lost - kept) > 0
    again = _sorted(ResultTable(out, LABEL_SCHEMA).read())
    floats = ("score", "distribution")  # recomputed in other batches: equal up to float rounding
    assert again.drop(list(floats)).equals(first.drop(list(floats)))
    for name in floats:
        values = [t.column(name) for t in (again, first)]
        values = [pc.list_flatten(v) if name == "distribution" else v for v in values]
        np.testing.assert_allclose(*values, rtol=1e-5, atol=1e-7)
