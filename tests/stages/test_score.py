"""Bulk scoring: one row per input on local and s3:// inputs with corrupt files, resume, summary, manifest, errors."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from cskd_ray.app.cli import main
from cskd_ray.app.commands import run_score_command
from cskd_ray.io import storage
from cskd_ray.io.decode import decode_image
from cskd_ray.io.feature_cache import LABEL_SCHEMA, ResultTable
from cskd_ray.io.transforms import normalize_batch, resize_crop
from cskd_ray.models import create_encoder
from cskd_ray.models.heads import AestheticHead, EncoderWithHead
from cskd_ray.models.saved import load_scoring_model


def write_model_folder(folder: Path, kind: str = "distribution", seed: int = 0) -> Path:
    """A real model folder (test_vit + aesthetic head, seeded random weights), as teacher/distill write them."""
    torch.manual_seed(seed)
    encoder = create_encoder("test_vit")
    model = EncoderWithHead(encoder.model, AestheticHead(encoder.dim, kind, 10 if kind == "distribution" else 1))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    head = {"kind": kind, "bins": 10 if kind == "distribution" else 1, "low": 1.0 if kind == "distribution" else 0.0,
            "high": 10.0 if kind == "distribution" else 1.0, "threshold": 5.0 if kind == "distribution" else 0.5}
    description = {"stage": "distill", "encoder": {"name": "test_vit", "pretrained": False, "projection": "linear"},
                   "head": head, "preprocess": encoder.preprocess.to_dict()}
    (folder / "model.json").write_text(json.dumps(description))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("student") / "model")


def _table(output: str):
    return ResultTable(output, LABEL_SCHEMA).read()


def _manifest(uri: str) -> list[tuple[str, float]]:
    return [(row["uri"], float(row["score"])) for row in csv.DictReader(io.StringIO(storage.read_text(uri)))]


def _readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(# Recompute the score summary.*?)```", text, re.S).group(1)


@pytest.mark.ray
def test_local_scoring_summary_manifest_and_resume_after_lost_shards(ray_session, demo_data: Path, model_dir: Path,
                                                                     tmp_path: Path, capsys) -> None:
    images = Path(shutil.copytree(demo_data / "images", tmp_path / "images"))
    out = tmp_path / "scores"
    small = ["--batch-size", "8", "--set", "shard_rows=8", "--set", "decode_batch_size=8"]
    status = main(["score", "--model", str(model_dir), "--input", str(images), "--output", str(out), *small])
    assert status == 0
    table = _table(str(out))
    assert table.schema.equals(LABEL_SCHEMA) and len(table) == 64 and len(set(table.column("uri").to_pylist())) == 64
    errors = table.filter(pc.is_valid(table.column("error")))
    assert len(errors) == 4 and errors.column("score").null_count == 4
    assert all(e.startswith(("not an image", "truncated image", "empty file", "corrupt image"))
               for e in errors.column("error").to_pylist())
    # scores equal the PyTorch model's on the same preprocessing
    scorer = load_scoring_model(str(model_dir))
    good = sorted(p for p in images.iterdir() if decode_image(p.read_bytes()).ok)[:4]
    pixels = np.stack([resize_crop(decode_image(p.read_bytes()).image, scorer.preprocess) for p in good])
    expected, _ = scorer.predict(normalize_batch(pixels, scorer.preprocess))
    by_uri = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist(), strict=True))
    np.testing.assert_allclose([by_uri[str(p)] for p in good], expected.numpy(), rtol=1e-4)
    # the summary printed and saved equals what the README's pyarrow snippet reads from the Parquet
    printed = capsys.readouterr().out
    assert "score: output holds 64 rows: 60 scored, 4 errors (" in printed
    runs = sorted((out / "_runs").glob("*.json"))
    assert len(runs) == 1
    summary = json.loads(runs[0].read_text())
    namespace: dict = {}
    exec(_readme_snippet().replace('out = "runs/scores"', f"out = {str(out)!r}"), namespace)  # noqa: S102
    assert summary["table"]["rows"] == namespace["table"].num_rows == 64
    assert summary["table"]["scored"] == len(namespace["scores"]) == 60
    assert summary["table"]["errors_by_kind"] == {k: namespace["kinds"].count(k) for k in set(namespace["kinds"])}
    assert summary["table"]["histogram"]["counts"] == namespace["counts"].tolist()
    assert sum(summary["table"]["histogram"]["counts"]) == 60 and summary["run"]["images_per_s"] > 0

    # a killed run: three shards lost, a half-written temporary file left behind
    shards = ResultTable(str(out), LABEL_SCHEMA).shards()
    assert len(shards) >= 5
    lost = 0
    for shard in shards[1:4]:
        lost += pq.read_metadata(shard).num_rows
        Path(shard).unlink()
    (out / "part-20990101-000000-deadbeef0000.parquet.tmp-0123").write_bytes(b"PAR1 half a shard")
    threshold = float(np.median([s for s in by_uri.values() if s is not None]))
    summary = run_score_command(str(model_dir), [str(images)], str(out), None,
                                ["batch_size=8", "shard_rows=8", f"min_score={threshold}"], printer=lambda line: None)
    assert summary["run"]["new_rows"] == lost and summary["run"]["already_done"] == 64 - lost
    table = _table(str(out))
    assert len(table) == 64 and sorted(table.column("uri").to_pylist()) == sorted(by_uri)
    rescored = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist(), strict=True))
    for uri, score in by_uri.items():
        assert (rescored[uri] is None and score is None) or rescored[uri] == pytest.approx(score, rel=1e-5)
    # the manifest: every URI at or above the threshold once, sorted; a rerun rewrites the same file
    manifest = _manifest(summary["manifest"])
    expected_uris = sorted(u for u, s in by_uri.items() if s is not None and s >= threshold)
    assert [u for u, _ in manifest] == expected_uris and summary["manifest_rows"] == len(expected_uris) >= 30
    again = run_score_command(str(model_dir), [str(images)], str(out), None, [f"min_score={threshold}"],
                              printer=lambda line: None)
    assert again["run"]["new_rows"] == 0 and _manifest(again["manifest"]) == manifest and len(_table(str(out))) == 64


@pytest.mark.ray
@pytest.mark.s3
def test_s3_inputs_with_corrupt_files_score_to_s3(ray_session, demo_data: Path, model_dir: Path,
                                                  s3_bucket: str) -> None:
    files = sorted((demo_data / "images").iterdir())
    corrupt = [p for p in files if not decode_image(p.read_bytes()).ok]
    for path in [*corrupt, *[p for p in files if p not in corrupt][:12]]:  # 12 good + 4 corrupt objects
        storage.write_bytes_once(f"{s3_bucket}/photos/{path.name}", path.read_bytes())
    out = f"{s3_bucket}/scores"
    summary = run_score_command(str(model_dir), [f"{s3_bucket}/photos/"], out, None, ["min_score=1.0"],
                                printer=lambda line: None)
    assert summary["images_in"] == 16 and summary["table"]["scored"] == 12 and summary["table"]["errors"] == 4
    table = _table(out)
    assert len(table) == 16 and all(u.startswith(f"{s3_bucket}/photos/") for u in table.column("uri").to_pylist())
    assert len(_manifest(summary["manifest"])) == 12 and summary["summary_json"].startswith(f"{out}/_runs/")
    assert json.loads(storage.read_text(summary["summary_json"]))["table"]["rows"] == 16
    again = run_score_command(str(model_dir), [f"{s3_bucket}/photos/"], out, None, [], printer=lambda line: None)
    assert again["run"]["new_rows"] == 0 and len(_table(out)) == 16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "error: --batch-size: Input should be greater than or equal to 1 (got 0)"),
        (["--concurrency", "0"], "error: --concurrency: Input should be greater than or equal to 1 (got 0)"),
        (["--set", "shard_rowz=3"], "error: unknown key 'shard_rowz' in score config (did you mean "),
    ],
)
def test_bad_flags_exit_2_with_one_line(model_dir: Path, tmp_path: Path, capsys, extra: list[str],
                                        message: str) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    status = main(["score", "--model", str(model_dir), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                   *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(message)


def test_bad_model_or_input_exit_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    status = main(["score", "--model", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and f"{tmp_path}: not a model folder" in err[0]
    status = main(["score", "--model", str(model_dir), "--input", str(tmp_path / "nope"), "--output",
                   str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and str(tmp_path / "nope") in err[0]
