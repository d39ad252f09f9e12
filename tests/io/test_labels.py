"""Tests for :mod:`cskd_ray.io.labels`."""

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cskd_ray.io.labels import LABEL_FORMATS, LabelFormatError, load_labels

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("score", pa.float64()),
        ("distribution", pa.list_(pa.float64())),
        ("split", pa.string()),
    ]
)

AVA_TXT = (
    "1 100 0 0 0 0 1 1 0 0 0 0 0 0 0\n2 200 0 0 0 0 0 0 0 0 0 4 1 2 3\n\n3 300 2 0 1 0 0 0 0 0 0 1 12 0 5\n"
)
TANET_HEADER = (
    "image_id,score2,score3,score4,score5,score6,score7,score8,score9,score10,score11,tag1,tag2,tag3\n"
)
TANET_CSV = (
    TANET_HEADER
    + "100,0,0,0,0,1,1,0,0,0,0,0,0,0\n200,0,0,0,0,0,0,0,0,0,4,1,2,3\n300,2,0,1,0,0,0,0,0,0,1,12,0,5\n"
)
AVA_SCORES = [5.5, 10.0, (2 * 1 + 3 * 1 + 10 * 1) / 4]
AVA_DISTS = [
    [0, 0, 0, 0, 0.5, 0.5, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0],
    [0.5, 0, 0.25, 0, 0, 0, 0, 0, 0, 0.25],
]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _check(table: pa.Table) -> dict[str, list]:
    """Assert the output schema and distribution normalisation; return the table as columns."""
    assert table.schema == SCHEMA
    cols = table.to_pydict()
    for dist in cols["distribution"]:
        if dist is not None:
            assert sum(dist) == pytest.approx(1.0, abs=1e-12)
    return cols


# --------------------------------------------------------------------------- formats


def test_label_formats_lists_every_format():
    """LABEL_FORMATS names all supported formats."""
    assert set(LABEL_FORMATS) == {"ava", "aadb", "para", "tad66k", "koniq", "spaq", "csv", "parquet"}


def test_ava_txt_without_test_list(tmp_path):
    """AVA.txt: score = Σ k·p_k, normalised votes, bare ``{id}.jpg`` uris and null split."""
    cols = _check(load_labels("ava", _write(tmp_path / "AVA.txt", AVA_TXT)))
    assert cols["uri"] == ["100.jpg", "200.jpg", "300.jpg"]
    assert cols["score"] == pytest.approx(AVA_SCORES)
    for got, want in zip(cols["distribution"], AVA_DISTS, strict=True):
        assert got == pytest.approx(want)
    assert cols["split"] == [None, None, None]


def test_ava_txt_with_test_list(tmp_path):
    """A test list (``.jpg`` suffixes and blank lines allowed) marks test ids; the rest are train."""
    test_list = _write(tmp_path / "test.jpgl", "200.jpg\n\n300\n")
    cols = _check(load_labels("ava", _write(tmp_path / "AVA.txt", AVA_TXT), test_list=test_list))
    assert cols["split"] == ["train", "test", "test"]


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("/data/ava", "/data/ava/100.jpg"),
        ("/data/ava/", "/data/ava/100.jpg"),
        ("s3://bucket/prefix", "s3://bucket/prefix/100.jpg"),
        ("s3://bucket/prefix/", "s3://bucket/prefix/100.jpg"),
    ],
)
def test_ava_images_root(tmp_path, root, expected):
    """images_root is joined with a single slash, also for s3:// prefixes."""
    cols = _check(load_labels("ava", _write(tmp_path / "AVA.txt", AVA_TXT), root))
    assert cols["uri"][0] == expected


def test_ava_tanet_csv_split_from_stem(tmp_path):
    """The TANet CSV form of AVA gives the same values; split comes from the file stem."""
    for stem, split in [
        ("ava_tanet_test", "test"),
        ("ava_tanet_val", "val"),
        ("train_ava", "train"),
        ("ava", None),
    ]:
        cols = _check(load_labels("ava", _write(tmp_path / f"{stem}.csv", TANET_CSV)))
        assert cols["uri"] == ["100.jpg", "200.jpg", "300.jpg"]
        assert cols["score"] == pytest.approx(AVA_SCORES)
        assert cols["distribution"][2] == pytest.approx(AVA_DISTS[2])
        assert cols["split"] == [split] * 3


def test_ava_tanet_csv_test_list_overrides_stem(tmp_path):
    """With a test list, the TANet CSV split is test/train regardless of the file name."""
    test_list = _write(tmp_path / "ids.txt", "100\n")
    cols = _check(load_labels("ava", _write(tmp_path / "ava_tanet_val.csv", TANET_CSV), test_list=test_list))
    assert cols["split"] == ["test", "train", "train"]


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("imgListTrainRegression_score.txt", "train"),
        ("imgListValidationRegression_score.txt", "val"),
        ("imgListTestNewRegression_score.txt", "test"),
        ("scores.txt", None),
    ],
)
def test_aadb(tmp_path, name, split):
    """AADB: scalar scores in [0, 1], split from the file name."""
    path = _write(tmp_path / name, "farm1_1.jpg 0.45\nfarm1_2.jpg 1\n\n")
    cols = _check(load_labels("aadb", path, "/img/aadb"))
    assert cols["uri"] == ["/img/aadb/farm1_1.jpg", "/img/aadb/farm1_2.jpg"]
    assert cols["score"] == [0.45, 1.0]
    assert cols["distribution"] == [None, None]
    assert cols["split"] == [split, split]


PARA_HEADER = (
    "userId,sessionId,imageName,"
    + ",".join(f"aestheticScore_{1 + 0.5 * i:.1f}" for i in range(9))
    + ",aestheticScore_mean,qualityScore_mean\n"
)


@pytest.mark.parametrize(("name", "split"), [("PARA-GiaaTrain.csv", "train"), ("PARA-GiaaTest.csv", "test")])
def test_para(tmp_path, name, split):
    """PARA: score = aestheticScore_mean, nine bins normalised, uri = sessionId/imageName."""
    text = (
        PARA_HEADER
        + "u1,session1,a.jpg,0,0,0,1,2,1,0,0,0,3.0,3.5\nu2,session2,b.jpg,0,0,0,0,0,0,0,0.5,0.5,4.75,4\n"
    )
    cols = _check(load_labels("para", _write(tmp_path / name, text)))
    assert cols["uri"] == ["session1/a.jpg", "session2/b.jpg"]
    assert cols["score"] == [3.0, 4.75]
    assert cols["distribution"][0] == pytest.approx([0, 0, 0, 0.25, 0.5, 0.25, 0, 0, 0])
    assert cols["distribution"][1] == pytest.approx([0, 0, 0, 0, 0, 0, 0, 0.5, 0.5])
    assert cols["split"] == [split, split]


@pytest.mark.parametrize(
    ("name", "split"), [("train.csv", "train"), ("test.csv", "test"), ("tad66k.csv", None)]
)
def test_tad66k(tmp_path, name, split):
    """TAD66K: ``image,score`` with CRLF line endings; split from the stem."""
    path = tmp_path / name
    path.write_bytes(b"image,score\r\nhs_yin152947873.jpg,1.9\r\n43751877@N085618633908.jpg,2.21\r\n")
    cols = _check(load_labels("tad66k", str(path)))
    assert cols["uri"] == ["hs_yin152947873.jpg", "43751877@N085618633908.jpg"]
    assert cols["score"] == [1.9, 2.21]
    assert cols["distribution"] == [None, None]
    assert cols["split"] == [split, split]


def test_koniq_with_set_column(tmp_path):
    """KonIQ: score = MOS (quoted header, extra columns), split from the ``set`` column."""
    text = (
        '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore","set"\n'
        '"a.jpg",0,1,2,3,4,10,3.0,0.9,50.1,"training"\n'
        '"b.jpg",1,1,1,1,1,5,3.5,1.4,60.2,"validation"\n'
        '"c.jpg",1,0,0,0,0,1,1.25,0,10.0,"test"\n'
    )
    cols = _check(
        load_labels("koniq", _write(tmp_path / "koniq10k_distributions_sets.csv", text), "s3://b/k")
    )
    assert cols["uri"] == ["s3://b/k/a.jpg", "s3://b/k/b.jpg", "s3://b/k/c.jpg"]
    assert cols["score"] == [3.0, 3.5, 1.25]
    assert cols["distribution"] == [None, None, None]
    assert cols["split"] == ["train", "val", "test"]


def test_koniq_without_set_column(tmp_path):
    """KonIQ without a ``set`` column has a null split."""
    text = "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore\na.jpg,0,1,2,3,4,10,3.0,0.9,50.1\n"
    cols = _check(load_labels("koniq", _write(tmp_path / "koniq10k_scores_and_distributions.csv", text)))
    assert cols["score"] == [3.0]
    assert cols["split"] == [None]


@pytest.mark.parametrize("header", ["Image name,MOS,Brightness", " image_name , mos ", "Image_name,MOS"])
def test_spaq(tmp_path, header):
    """SPAQ CSV export: ``Image name`` / ``MOS`` with case and whitespace variations."""
    cols = _check(
        load_labels(
            "spaq",
            _write(tmp_path / "mos.csv", f"{header}\n00001.png,42.5{',7' * (header.count(',') - 1)}\n"),
        )
    )
    assert cols == {"uri": ["00001.png"], "score": [42.5], "distribution": [None], "split": [None]}


def test_spaq_xlsx_is_rejected(tmp_path):
    """An .xlsx SPAQ file asks the user to export it to CSV."""
    path = tmp_path / "MOS and Image attribute scores.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(LabelFormatError, match="CSV"):
        load_labels("spaq", str(path))


def test_generic_csv_score_only(tmp_path):
    """Generic CSV with ``uri,score,split``; absolute uris are kept as-is with images_root."""
    text = "uri,score,split\na.jpg,3.5,train\ns3://other/b.jpg,7,\n"
    cols = _check(load_labels("csv", _write(tmp_path / "labels.csv", text), "/root"))
    assert cols == {
        "uri": ["/root/a.jpg", "s3://other/b.jpg"],
        "score": [3.5, 7.0],
        "distribution": [None, None],
        "split": ["train", None],
    }


@pytest.mark.parametrize(
    "cells",
    [['"[1, 3]"', '"[0.5, 0.5]"'], ["1 3", "0.5 0.5"], ["1;3", "0.5; 0.5"]],
    ids=["json", "space", "semicolon"],
)
def test_generic_csv_distribution_only(tmp_path, cells):
    """A distribution cell may be a JSON list or space/semicolon separated; score = Σ k·p_k."""
    text = f"uri,distribution\na.jpg,{cells[0]}\nb.jpg,{cells[1]}\n"
    cols = _check(load_labels("csv", _write(tmp_path / "labels.csv", text)))
    assert cols["distribution"] == [pytest.approx([0.25, 0.75]), pytest.approx([0.5, 0.5])]
    assert cols["score"] == pytest.approx([1 * 0.25 + 2 * 0.75, 1.5])
    assert cols["split"] == [None, None]


def test_generic_csv_score_and_distribution(tmp_path):
    """When both are given the score column wins and the distribution is normalised."""
    text = 'uri,score,distribution\na.jpg,9.0,"[2, 2]"\n'
    cols = _check(load_labels("csv", _write(tmp_path / "labels.csv", text)))
    assert cols["score"] == [9.0]
    assert cols["distribution"] == [[0.5, 0.5]]


def test_parquet(tmp_path):
    """Generic Parquet: list distributions are normalised; score derived as Σ k·p_k."""
    path = str(tmp_path / "labels.parquet")
    pq.write_table(
        pa.table({"uri": ["a.jpg", "b.jpg"], "distribution": [[1, 1, 2], [0, 0, 5]], "split": ["val", None]}),
        path,
    )
    cols = _check(load_labels("parquet", path, "s3://bucket/prefix"))
    assert cols["uri"] == ["s3://bucket/prefix/a.jpg", "s3://bucket/prefix/b.jpg"]
    assert cols["distribution"] == [pytest.approx([0.25, 0.25, 0.5]), pytest.approx([0, 0, 1])]
    assert cols["score"] == pytest.approx([0.25 + 0.5 + 1.5, 3.0])
    assert cols["split"] == ["val", None]


def test_parquet_score_only(tmp_path):
    """Generic Parquet with integer scores only: cast to float64, null distribution and split."""
    path = str(tmp_path / "labels.parquet")
    pq.write_table(pa.table({"uri": ["a.jpg"], "score": pa.array([4], pa.int32())}), path)
    assert _check(load_labels("parquet", path)) == {
        "uri": ["a.jpg"],
        "score": [4.0],
        "distribution": [None],
        "split": [None],
    }


# --------------------------------------------------------------------------- errors


def test_short_ava_line_names_file_and_line(tmp_path):
    """A line with too few fields names ``AVA.txt:<line>`` and the field count."""
    text = AVA_TXT.splitlines(keepends=True)
    path = _write(tmp_path / "AVA.txt", text[0] + text[1] + "3 300 1 2 3 4 5 6 7 8 9 10 0 0\n")
    with pytest.raises(LabelFormatError, match=r"AVA.txt:3: expected 15 space-separated fields .* got 14"):
        load_labels("ava", path)


def test_ava_zero_votes(tmp_path):
    """A line without votes is an error naming file:line."""
    path = _write(tmp_path / "AVA.txt", AVA_TXT + "4 400 0 0 0 0 0 0 0 0 0 0 1 2 3\n")
    with pytest.raises(LabelFormatError, match=r"AVA.txt:5: .*zero"):
        load_labels("ava", path)


def test_ava_non_integer_votes(tmp_path):
    """Non-integer vote counts name file:line."""
    with pytest.raises(LabelFormatError, match=r"AVA.txt:1: vote counts"):
        load_labels("ava", _write(tmp_path / "AVA.txt", "1 100 0 x 0 0 1 1 0 0 0 0 0 0 0\n"))


def test_tad66k_non_numeric_score(tmp_path):
    """A non-numeric score names file:line."""
    path = _write(tmp_path / "train.csv", "image,score\na.jpg,2.5\nb.jpg,high\n")
    with pytest.raises(LabelFormatError, match=r"train.csv:3: score must be numeric, got 'high'"):
        load_labels("tad66k", path)


def test_non_finite_score(tmp_path):
    """NaN scores are rejected with file:line."""
    with pytest.raises(LabelFormatError, match=r"labels.csv:2: score must be finite"):
        load_labels("csv", _write(tmp_path / "labels.csv", "uri,score\na.jpg,nan\n"))


def test_wrong_field_count_in_csv(tmp_path):
    """A CSV row with the wrong number of fields names file:line."""
    with pytest.raises(LabelFormatError, match=r"test.csv:3: expected 2 comma-separated fields"):
        load_labels("tad66k", _write(tmp_path / "test.csv", "image,score\na.jpg,1\nb.jpg,2,3\n"))


def test_unknown_format_suggests_close_matches(tmp_path):
    """An unknown fmt raises ValueError suggesting close matches and listing the choices."""
    with pytest.raises(ValueError, match="did you mean 'ava'") as info:
        load_labels("avaa", str(tmp_path / "AVA.txt"))
    assert not isinstance(info.value, LabelFormatError)
    assert all(name in str(info.value) for name in LABEL_FORMATS)


def test_missing_file_names_path(tmp_path):
    """A missing label file raises FileNotFoundError with the path."""
    path = str(tmp_path / "nope" / "AVA.txt")
    with pytest.raises(FileNotFoundError, match="AVA.txt") as info:
        load_labels("ava", path)
    assert info.value.filename == path


def test_missing_test_list(tmp_path):
    """A missing test list is a FileNotFoundError too."""
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_labels("ava", _write(tmp_path / "AVA.txt", AVA_TXT), test_list=str(tmp_path / "missing.txt"))


def test_test_list_only_for_ava(tmp_path):
    """test_list with a non-AVA format is a ValueError."""
    with pytest.raises(ValueError, match="test_list"):
        load_labels("tad66k", _write(tmp_path / "t.csv", "image,score\na,1\n"), test_list="x")


def test_generic_csv_without_score_or_distribution(tmp_path):
    """A generic CSV needs score and/or distribution; the message names the file and found columns."""
    with pytest.raises(LabelFormatError, match=r"labels.csv: .*found columns: \['uri', 'rating'\]"):
        load_labels("csv", _write(tmp_path / "labels.csv", "uri,rating\na.jpg,3\n"))


def test_generic_csv_mixed_length_distributions(tmp_path):
    """Distributions of different lengths in one file name the offending line."""
    with pytest.raises(LabelFormatError, match=r"labels.csv:3: distribution has 3 bins"):
        load_labels("csv", _write(tmp_path / "labels.csv", "uri,distribution\na,1 2\nb,1 2 3\n"))


@pytest.mark.parametrize(
    ("cell", "match"), [("0 0", "sums to zero"), ("1 -1 2", "non-negative"), ("a b", "cannot parse")]
)
def test_generic_csv_bad_distribution(tmp_path, cell, match):
    """Zero-sum, negative and unparsable distributions name file:line."""
    with pytest.raises(LabelFormatError, match=rf"labels.csv:2: .*{match}"):
        load_labels("csv", _write(tmp_path / "labels.csv", f"uri,distribution\na,{cell}\n"))


def test_parquet_zero_distribution_names_row(tmp_path):
    """Parquet errors name the 0-based row index."""
    path = str(tmp_path / "labels.parquet")
    pq.write_table(pa.table({"uri": ["a", "b"], "distribution": [[1.0, 2.0], [0.0, 0.0]]}), path)
    with pytest.raises(LabelFormatError, match=r"labels.parquet: row 1: .*zero"):
        load_labels("parquet", path)


# --------------------------------------------------------------------------- real files


def _shared_labels() -> Path:
    override = os.environ.get("CSKD_SHARED_LABELS")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "data" / "labels"


def _real(name: str) -> Path:
    path = _shared_labels() / name
    if not path.is_file():
        pytest.skip(f"shared label file {path} not available")
    return path


def _data_rows(path: Path) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip()) - 1


@pytest.fixture(scope="module")
def ava_sample() -> pa.Table:
    """The real AVA_sample.txt (official AVA.txt format)."""
    return load_labels("ava", str(_real("AVA_sample.txt")))


def test_real_ava_sample(ava_sample):
    """AVA_sample.txt: 1000 rows, valid distributions, scores in [1, 10] with a mean in (5, 6)."""
    cols = _check(ava_sample)
    assert ava_sample.num_rows == 1000
    dists = np.array(cols["distribution"])
    assert dists.shape == (1000, 10)
    assert np.abs(dists.sum(axis=1) - 1).max() < 1e-9
    scores = np.array(cols["score"])
    assert scores.min() >= 1 and scores.max() <= 10
    assert 5 < scores.mean() < 6
    np.testing.assert_allclose(scores, dists @ np.arange(1, 11), rtol=0, atol=1e-12)
    assert set(cols["split"]) == {None}


def test_real_ava_first_row(ava_sample):
    """First line ``1 591979 0 1 2 13 45 44 16 0 1 1 15 28 738``: 123 votes, score 680/123."""
    row = ava_sample.slice(0, 1).to_pylist()[0]
    assert row["uri"] == "591979.jpg"
    votes = [0, 1, 2, 13, 45, 44, 16, 0, 1, 1]
    assert sum(votes) == 123
    numerator = 1 * 0 + 2 * 1 + 3 * 2 + 4 * 13 + 5 * 45 + 6 * 44 + 7 * 16 + 8 * 0 + 9 * 1 + 10 * 1
    assert row["score"] == pytest.approx(numerator / 123, abs=1e-12) == pytest.approx(5.528455284552845)
    assert row["distribution"] == pytest.approx([v / 123 for v in votes], abs=1e-15)


@pytest.mark.parametrize(("name", "split"), [("ava_tanet_test.csv", "test"), ("ava_tanet_val.csv", "val")])
def test_real_ava_tanet(name, split):
    """TANet CSVs: one row per non-blank data line, split from the stem, valid distributions."""
    path = _real(name)
    table = load_labels("ava", str(path))
    assert table.num_rows == _data_rows(path)
    cols = _check(table)
    assert set(cols["split"]) == {split}
    dists = np.array(cols["distribution"])
    assert np.abs(dists.sum(axis=1) - 1).max() < 1e-9
    assert 1 <= min(cols["score"]) and max(cols["score"]) <= 10
    assert len(set(cols["uri"])) == table.num_rows


def test_real_ava_sample_matches_tanet_val(ava_sample):
    """AVA_sample.txt is the first 1000 rows of ava_tanet_val.csv: same ids, scores and distributions."""
    val = load_labels("ava", str(_real("ava_tanet_val.csv"))).slice(0, ava_sample.num_rows)
    assert val.column("uri").to_pylist() == ava_sample.column("uri").to_pylist()
    np.testing.assert_allclose(
        val.column("score").to_numpy(), ava_sample.column("score").to_numpy(), atol=1e-12
    )
    assert val.column("distribution").to_pylist() == ava_sample.column("distribution").to_pylist()


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_tad66k(split):
    """TAD66K: row counts from the file, scalar scores on the 1..10 scale, split from the stem."""
    path = _real(f"tad66k/{split}.csv")
    table = load_labels("tad66k", str(path), "s3://bucket/tad66k")
    cols = _check(table)
    assert table.num_rows == _data_rows(path)
    assert set(cols["split"]) == {split}
    assert set(cols["distribution"]) == {None}
    assert all(uri.startswith("s3://bucket/tad66k/") and uri.endswith(".jpg") for uri in cols["uri"])
    assert all(math.isfinite(s) and 1 <= s <= 10 for s in cols["score"])
    if split == "test":
        assert (cols["uri"][0], cols["score"][0]) == ("s3://bucket/tad66k/hs_yin152947873.jpg", 1.9)
