"""Load image-aesthetics label files into one uniform Arrow table.

Every loader returns a :class:`pyarrow.Table` with the columns ``uri`` (string), ``score`` (float64, on the
dataset's own scale), ``distribution`` (list<float64> summing to 1, null for scalar datasets) and ``split``
(string or null). For vote histograms the score is the expected rating ``score = Σ k·p_k`` for k = 1..K,
where ``p_k = c_k / Σ c`` are the normalised vote counts.
"""

import csv
import difflib
import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from cskd_ray.config import StrictModel


class LabelsConfig(StrictModel):
    """Where the labels are and how to read them (see ``cskd_ray.io.labels.load_labels``)."""

    format: Literal["ava", "aadb", "para", "tad66k", "koniq", "spaq", "csv", "parquet"] = Field(
        "ava", description="Label file format (cskd_ray.io.labels).")
    images_root: str | None = Field(None, description="Folder or s3:// prefix the label file's names are under.")
    test_list: str | None = Field(None, description="AVA: the official test list (image ids), gives the split.")
    val_split: str = Field("test", description="Rows of this split validate; all other rows train, except rows of "
                           "split 'test', which never train (they are read once, by evaluate).")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Carve this fraction of the training rows (chosen by a "
                                "hash of the image name, the same on every run) as split 'val'; needs val_split: val.")
    threshold: float | None = Field(None, description="Accuracy threshold; null: 5 for 10-bin labels, else midpoint.")

    @model_validator(mode="after")
    def _carved_split_validates(self) -> "LabelsConfig":
        if self.val_fraction > 0 and self.val_split != VAL_SPLIT:
            raise ValueError(f"labels.val_fraction={self.val_fraction} carves split {VAL_SPLIT!r}, but "
                             f"labels.val_split is {self.val_split!r}: set labels.val_split={VAL_SPLIT}")
        return self


VAL_SPLIT = "val"
TEST_SPLIT = "test"


def in_validation_carve(name: str, fraction: float) -> bool:
    """Whether an image falls in the carved validation split: ``sha256(stem) / 2^64 < fraction``.

    ``stem`` is the file name without folder and extension (the AVA image id), so the choice does not depend
    on where the images are stored, and a larger fraction only adds images.
    """
    stem = os.path.splitext(name.rstrip("/").rsplit("/", 1)[-1])[0]
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") < fraction * 2**64


def carve_validation(table: pa.Table, fraction: float) -> pa.Table:
    """Gives split ``val`` to the rows picked by :func:`in_validation_carve` among those whose split is not ``test``."""
    if fraction <= 0:
        return table
    splits = table.column("split").to_pylist()
    carved = [VAL_SPLIT if s != TEST_SPLIT and in_validation_carve(u, fraction) else s
              for u, s in zip(table.column("uri").to_pylist(), splits, strict=True)]
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(carved, _STR))


LABEL_FORMATS = ("ava", "aadb", "para", "tad66k", "koniq", "spaq", "csv", "parquet")
_DIST = pa.list_(pa.float64())
_STR = pa.string()
SCHEMA = pa.schema([("uri", _STR), ("score", pa.float64()), ("distribution", _DIST), ("split", _STR)])

_Where = Callable[[int], str]
_Rows = list[tuple[int, list[str]]]
_Parsed = tuple[list[str], np.ndarray, np.ndarray | None, list[str | None], _Where]
_SET_NAMES = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}


class LabelFormatError(ValueError):
    """A label file is malformed; the message names the file and, where known, the 1-based line."""


def _norm(name: str) -> str:
    """Normalise a column name: case-insensitive, ignoring whitespace and underscores."""
    return re.sub(r"[\s_]+", "", name).lower()


def _split_from_name(path: str) -> str | None:
    """Infer a split ("test", "val", "train") from the file stem, or None."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    return next((s for s in ("test", "val", "train") if s in stem), None)


def _read_csv(path: str) -> tuple[list[str], _Rows]:
    """Read a CSV file as (header, [(1-based line number, fields)]), skipping blank rows."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header, rows = [h.strip() for h in next(reader, [])], []
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise LabelFormatError(
                        f"{path}:{reader.line_num}: expected {len(header)} comma-separated fields "
                        f"({', '.join(header)}), got {len(fields)}"
                    )
                rows.append((reader.line_num, fields))
        except csv.Error as exc:
            raise LabelFormatError(f"{path}:{reader.line_num}: {exc}") from None
    return header, rows


def _find(path: str, header: Sequence[str], *names: str, required: bool = True) -> int | None:
    """Return the index of the first column matching any of ``names`` (see :func:`_norm`)."""
    index = {_norm(h): i for i, h in enumerate(header)}
    for name in names:
        if _norm(name) in index:
            return index[_norm(name)]
    if required:
        raise LabelFormatError(f"{path}: missing column {names[0]!r}; found columns: {list(header)}")
    return None


def _matrix(path: str, rows: _Rows, cols: Sequence[int], what: str) -> np.ndarray:
    """Parse the given columns of every row as floats into an (n, len(cols)) array."""
    out = np.empty((len(rows), len(cols)))
    for i, (lineno, fields) in enumerate(rows):
        try:
            out[i] = [float(fields[c]) for c in cols]
        except ValueError:
            got = ",".join(fields[c] for c in cols)
            raise LabelFormatError(f"{path}:{lineno}: {what} must be numeric, got {got!r}") from None
    return out


def _line_where(path: str, rows: _Rows) -> _Where:
    """Map a row index to a ``file:line`` location string."""
    return lambda i: f"{path}:{rows[i][0]}"


def _normalise(counts: np.ndarray, where: _Where) -> np.ndarray:
    """Validate an (n, K) array of votes or proportions and normalise each row to sum to 1."""
    bad = np.flatnonzero(~np.isfinite(counts).all(axis=1) | (counts < 0).any(axis=1))
    if bad.size:
        raise LabelFormatError(f"{where(bad[0])}: distribution must be finite and non-negative")
    totals = counts.sum(axis=1)
    zero = np.flatnonzero(totals <= 0)
    if zero.size:
        raise LabelFormatError(f"{where(zero[0])}: distribution sums to zero (no votes)")
    return counts / totals[:, None]


def _expected(probs: np.ndarray) -> np.ndarray:
    """Expected rating ``Σ k·p_k`` with k = 1..K for each row of an (n, K) probability array."""
    return probs @ np.arange(1, probs.shape[1] + 1, dtype=np.float64)


def _load_ava(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse the official space-separated AVA.txt, or the TANet CSV form of AVA."""
    with open(path, encoding="utf-8-sig") as fh:
        if fh.readline().lstrip().startswith("image_id,"):
            return _load_ava_csv(path, test_ids)
        fh.seek(0)
        ids: list[str] = []
        linenos: list[int] = []
        counts: list[int] = []
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 15:
                raise LabelFormatError(
                    f"{path}:{lineno}: expected 15 space-separated fields (index, image id, 10 vote counts, "
                    f"2 tags, challenge id), got {len(parts)}"
                )
            try:
                counts.extend(map(int, parts[2:12]))
            except ValueError:
                got = " ".join(parts[2:12])
                raise LabelFormatError(f"{path}:{lineno}: vote counts must be integers: {got!r}") from None
            ids.append(parts[1])
            linenos.append(lineno)
    where = lambda i: f"{path}:{linenos[i]}"  # noqa: E731
    probs = _normalise(np.asarray(counts, dtype=np.float64).reshape(-1, 10), where)
    return _ava_result(ids, probs, test_ids, None, where)


def _ava_result(
    ids: list[str], probs: np.ndarray, test_ids: set[str] | None, split: str | None, where: _Where
) -> _Parsed:
    """Assemble AVA rows: ``{id}.jpg`` names, ``score = Σ k·p_k`` and test/train splits from ``test_ids``."""
    splits = [split] * len(ids) if test_ids is None else ["test" if i in test_ids else "train" for i in ids]
    return [f"{i}.jpg" for i in ids], _expected(probs), probs, splits, where


def _load_ava_csv(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse the TANet CSV form of AVA (``image_id,score2..score11,tag1,tag2,tag3``)."""
    header, rows = _read_csv(path)
    cols = [_find(path, header, f"score{k}") for k in range(2, 12)]
    id_col = _find(path, header, "image_id")
    where = _line_where(path, rows)
    probs = _normalise(_matrix(path, rows, cols, "vote counts"), where)
    ids = [fields[id_col].strip() for _, fields in rows]
    return _ava_result(ids, probs, test_ids, _split_from_name(path), where)


def _scalar(path: str, header: list[str], rows: _Rows, name: Sequence[str], score: str) -> _Parsed:
    """Parse a table with an image-name column and a scalar score column; split from the file name."""
    name_col = _find(path, header, *name)
    scores = _matrix(path, rows, [_find(path, header, score)], "score")[:, 0]
    names = [fields[name_col].strip() for _, fields in rows]
    return names, scores, None, [_split_from_name(path)] * len(rows), _line_where(path, rows)


def _load_aadb(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse an AADB ``imgList*Regression_score.txt`` file (``name score`` per line, score in [0, 1])."""
    rows: _Rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if parts and len(parts) != 2:
                raise LabelFormatError(f"{path}:{lineno}: expected 2 fields (name score), got {len(parts)}")
            if parts:
                rows.append((lineno, parts))
    return _scalar(path, ["name", "score"], rows, ["name"], "score")


def _load_para(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse a PARA GIAA CSV: nine ``aestheticScore_1.0..5.0`` bins and ``aestheticScore_mean``."""
    header, rows = _read_csv(path)
    bins = [_find(path, header, f"aestheticScore_{1 + 0.5 * i:.1f}") for i in range(9)]
    session, image = _find(path, header, "sessionId"), _find(path, header, "imageName")
    where = _line_where(path, rows)
    probs = _normalise(_matrix(path, rows, bins, "aesthetic score bins"), where)
    scores = _matrix(path, rows, [_find(path, header, "aestheticScore_mean")], "aestheticScore_mean")[:, 0]
    names = [f"{fields[session].strip()}/{fields[image].strip()}" for _, fields in rows]
    return names, scores, probs, [_split_from_name(path)] * len(rows), where


def _load_tad66k(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse a TAD66K CSV (``image,score``); split from the file stem."""
    return _scalar(path, *_read_csv(path), ["image"], "score")


def _load_koniq(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse ``koniq10k_scores_and_distributions.csv``: score = MOS, split from an optional ``set`` column."""
    header, rows = _read_csv(path)
    names, scores, _, _, where = _scalar(path, header, rows, ["image_name"], "MOS")
    set_col = _find(path, header, "set", required=False)
    if set_col is None:
        return names, scores, None, [None] * len(names), where
    raw = [fields[set_col].strip().lower() for _, fields in rows]
    return names, scores, None, [_SET_NAMES.get(s, s or None) for s in raw], where


def _load_spaq(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse a CSV export of SPAQ's ``MOS and Image attribute scores`` (``Image name``, ``MOS``)."""
    if path.lower().endswith((".xlsx", ".xls")):
        raise LabelFormatError(f"{path}: SPAQ .xlsx is not read directly; export the sheet to CSV first")
    names, scores, _, _, where = _scalar(path, *_read_csv(path), ["Image name", "image"], "MOS")
    return names, scores, None, [None] * len(names), where


def _generic_columns(path: str, header: Sequence[str]) -> tuple[int, int | None, int | None, int | None]:
    """Locate the ``uri``, ``score``, ``distribution`` and ``split`` columns of a generic table."""
    score_col = _find(path, header, "score", required=False)
    dist_col = _find(path, header, "distribution", required=False)
    if score_col is None and dist_col is None:
        raise LabelFormatError(
            f"{path}: a generic label table needs a 'score' and/or 'distribution' column; "
            f"found columns: {list(header)}"
        )
    return _find(path, header, "uri"), score_col, dist_col, _find(path, header, "split", required=False)


def _parse_dist(path: str, lineno: int, text: str) -> list[float]:
    """Parse a distribution cell: a JSON list, or numbers separated by spaces or semicolons."""
    text = text.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
            if not isinstance(values, list) or any(isinstance(v, (bool, str, list, dict)) for v in values):
                raise ValueError(text)
        else:
            values = [v for v in re.split(r"[\s;,]+", text) if v]
        out = [float(v) for v in values]
    except (ValueError, TypeError):
        out = []
    if not out:
        raise LabelFormatError(f"{path}:{lineno}: cannot parse distribution {text!r}")
    return out


def _check_lengths(lengths: np.ndarray, where: _Where) -> int:
    """Return the common distribution length, raising on mixed-length distributions."""
    bad = np.flatnonzero(lengths != lengths[0]) if lengths.size else lengths
    if bad.size:
        raise LabelFormatError(f"{where(bad[0])}: distribution has {lengths[bad[0]]} bins, not {lengths[0]}")
    return int(lengths[0]) if lengths.size else 0


def _load_csv(path: str, test_ids: set[str] | None) -> _Parsed:
    """Parse a generic CSV with ``uri`` and ``score`` and/or ``distribution`` (and optional ``split``)."""
    header, rows = _read_csv(path)
    uri_col, score_col, dist_col, split_col = _generic_columns(path, header)
    where = _line_where(path, rows)
    probs = None
    if dist_col is not None:
        raw = [_parse_dist(path, lineno, fields[dist_col]) for lineno, fields in rows]
        k = _check_lengths(np.array([len(r) for r in raw], dtype=np.int64), where)
        probs = _normalise(np.array(raw, dtype=np.float64).reshape(len(raw), k), where)
    scores = _expected(probs) if score_col is None else _matrix(path, rows, [score_col], "score")[:, 0]
    splits = [None if split_col is None else (fields[split_col].strip() or None) for _, fields in rows]
    return [fields[uri_col].strip() for _, fields in rows], scores, probs, splits, where


def _load_parquet(path: str, test_ids: set[str] | None) -> _Parsed:
    """Read a generic Parquet table (same columns as :func:`_load_csv`); errors name the row index."""
    table = pq.read_table(path)
    uri_col, score_col, dist_col, split_col = _generic_columns(path, table.column_names)
    where: _Where = lambda i: f"{path}: row {i}"  # noqa: E731
    probs = None
    if dist_col is not None:
        dist = table.column(dist_col).combine_chunks().cast(_DIST)
        if dist.null_count:
            raise LabelFormatError(f"{where(np.flatnonzero(dist.is_null())[0])}: missing distribution")
        k = _check_lengths(pc.list_value_length(dist).to_numpy(zero_copy_only=False), where)
        values = pc.list_flatten(dist).to_numpy(zero_copy_only=False)
        probs = _normalise(values.reshape(table.num_rows, k), where)
    if score_col is None:
        scores = _expected(probs)
    else:
        scores = table.column(score_col).cast(pa.float64()).to_numpy(zero_copy_only=False)
    names = table.column(uri_col).cast(_STR).to_pylist()
    splits = [None] * len(names) if split_col is None else table.column(split_col).cast(_STR).to_pylist()
    return names, scores, probs, splits, where


_LOADERS: dict[str, Callable[[str, "set[str] | None"], _Parsed]] = {
    "ava": _load_ava,
    "aadb": _load_aadb,
    "para": _load_para,
    "tad66k": _load_tad66k,
    "koniq": _load_koniq,
    "spaq": _load_spaq,
    "csv": _load_csv,
    "parquet": _load_parquet,
}


def _read_test_list(path: str) -> set[str]:
    """Read an AVA test list: one image id per line, optional ``.jpg`` suffix, blank lines ignored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "test list not found", path)
    with open(path, encoding="utf-8-sig") as fh:
        ids = (line.split()[0] for line in fh if line.strip())
        return {i[:-4] if i.lower().endswith(".jpg") else i for i in ids}


def _to_table(parsed: _Parsed, images_root: str | None) -> pa.Table:
    """Validate parsed columns and assemble the output table (``uri, score, distribution, split``)."""
    names, scores, probs, splits, where = parsed
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise LabelFormatError(f"{where(bad[0])}: score must be finite, got {scores[bad[0]]}")
    empty = next((i for i, name in enumerate(names) if not name), None)
    if empty is not None:
        raise LabelFormatError(f"{where(empty)}: missing image name / uri")
    if images_root:
        prefix = images_root.rstrip("/") + "/"
        names = [n if "://" in n or n.startswith("/") else prefix + n for n in names]
    n = len(names)
    if probs is None:
        dist = pa.nulls(n, _DIST)
    else:
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * np.int32(probs.shape[1]))
        dist = pa.ListArray.from_arrays(offsets, pa.array(probs.ravel(), pa.float64()))
    columns = [pa.array(names, pa.string()), pa.array(scores, pa.float64()), dist]
    return pa.Table.from_arrays([*columns, pa.array(splits, pa.string())], schema=SCHEMA)


def load_labels(
    fmt: str, path: str, images_root: str | None = None, *, test_list: str | None = None
) -> pa.Table:
    """Load an aesthetics label file into a uniform table.

    For datasets with vote histograms (AVA, PARA, generic distributions) ``distribution`` holds the normalised
    votes ``p_k = c_k / Σ c``; where no score column exists the score is the expected rating
    ``score = Σ k·p_k`` for k = 1..K (AVA: K = 10, ratings 1..10). Scalar datasets get a null distribution.

    Args:
        fmt: One of :data:`LABEL_FORMATS`: ``ava`` (AVA.txt or the TANet CSV form), ``aadb``, ``para``,
            ``tad66k``, ``koniq``, ``spaq`` (CSV export), or generic ``csv`` / ``parquet`` tables with a
            ``uri`` column, ``score`` and/or ``distribution`` and an optional ``split``.
        path: Local path of the label file.
        images_root: Directory or URI prefix (e.g. ``s3://bucket/prefix``) joined with each image name to
            form ``uri``; without it ``uri`` is the bare, relative name. Absolute uris in generic tables
            (``/...`` or ``scheme://...``) are kept as they are.
        test_list: AVA only: file with one test image id per line; listed ids get split ``"test"``, the rest
            ``"train"``.

    Returns:
        A table with columns ``uri`` (string), ``score`` (float64, on the dataset's own scale),
        ``distribution`` (list<float64> summing to 1, or null) and ``split`` (string or null).

    Raises:
        ValueError: ``fmt`` is unknown (the message lists the valid choices), or ``test_list`` is given
            for a format other than ``ava``.
        FileNotFoundError: ``path`` or ``test_list`` does not exist.
        LabelFormatError: The file is malformed; the message names the file and the 1-based line
            (row index for Parquet).
    """
    key = fmt.strip().lower()
    loader = _LOADERS.get(key)
    if loader is None:
        close = difflib.get_close_matches(key, LABEL_FORMATS, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown label format {fmt!r}{hint} (valid choices: {', '.join(LABEL_FORMATS)})")
    if test_list is not None and key != "ava":
        raise ValueError(f"test_list is only supported for fmt='ava', not {fmt!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "label file not found", path)
    test_ids = None if test_list is None else _read_test_list(os.fspath(test_list))
    return _to_table(loader(path, test_ids), images_root)
