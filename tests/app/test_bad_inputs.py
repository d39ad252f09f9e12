"""Bad configs and arguments through the real CLI in a subprocess: exit 2, one ``error:`` line, no work started.

Each case runs ``python -m cskd_ray.app.cli ...`` with ``RAY_TMPDIR`` pointing at a fresh folder: Ray creates
its session folder there as soon as it starts, so the folder still being absent proves Ray never started.
The case's output path must not exist afterwards either (nothing was written).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

CONFIGS = REPO / "jobs" / "configs" / "demo"
CASE_SECONDS = 60  # a generous ceiling for one CLI run on a loaded 2-core box; most take 1-3 s


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, str]:
    """Paths the cases refer to: demo data, a file, an empty folder, a minimal feature cache."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "broken.yaml").write_text("input: [unclosed\n")
    (root / "list.yaml").write_text("- just\n- a list\n")
    cache = root / "cache"
    cache.mkdir()
    (cache / "_meta.json").write_text(json.dumps({"model": "cskd-tiny-vit", "dim": 4, "model_key": "k"}))
    schema = pa.schema(
        [("uri", pa.string()), ("sha256", pa.string()), ("feature", pa.list_(pa.float16())), ("error", pa.string())]
    )
    pq.write_table(schema.empty_table(), cache / "part-0.parquet")
    return {
        "root": str(root),
        "file": str(root / "a_file.txt"),
        "empty": str(root / "empty"),
        "cache": str(cache),
        "images": str(demo_data / "images"),
        "ava": str(demo_data / "AVA.txt"),
        "test_list": str(demo_data / "test.jpgl"),
    }


# (id, argv with {placeholders}, substrings the error line must hold)
CASES = [
    ("unknown-key", ["features", "{features}", "--set", "bogus=1"], ["'bogus'", "valid keys:", "batch_size"]),
    ("unknown-nested-key", ["features", "{features}", "--set", "clip.nmae=x"], ["clip.nmae", "did you mean 'name'"]),
    ("wrong-type", ["features", "{features}", "--set", "batch_size=abc"], ["batch_size", "valid integer", "'abc'"]),
    ("zero-size", ["features", "{features}", "--set", "batch_size=0"], ["batch_size", "greater than or equal to 1"]),
    ("negative-size", ["features", "{features}", "--set", "concurrency=-2"], ["concurrency", "greater than or equal"]),
    ("negative-lr", ["align", "{align}", "--set", "train.lr=-0.1"], ["train.lr", "greater than 0"]),
    ("bad-choice", ["features", "{features}", "--set", "precision=fp8"], ["precision", "'fp32'", "'bf16'"]),
    ("unknown-loss", ["align", "{align}", "--set", "loss=l3"], ["loss", "'cosine'", "'mse'"]),
    (
        "unknown-label-format",
        ["teacher", "{teacher}", "--set", "labels.format=imdb"],
        ["labels.format", "'ava'", "'tad66k'"],
    ),
    ("set-without-value", ["features", "{features}", "--set", "batch_size"], ["--set 'batch_size'", "key=value"]),
    ("config-not-found", ["features", "{root}/missing.yaml"], ["missing.yaml", "not found"]),
    ("config-not-yaml", ["features", "{root}/broken.yaml"], ["broken.yaml", "not valid YAML"]),
    ("config-not-mapping", ["features", "{root}/list.yaml"], ["list.yaml", "mapping"]),
    ("missing-input", ["features", "{features}", "--input", "{root}/nope"], ["input.0.uri", "nope", "no such"]),
    ("bad-input-scheme", ["features", "{features}", "--input", "gs://bucket/images"], ["input.0.uri", "'gs'", "s3://"]),
    ("bad-output-scheme", ["features", "{features}", "--output", "ftp://host/x"], ["output", "'ftp'", "s3://"]),
    (
        "output-under-a-file",
        ["features", "{features}", "--output", "{file}/out"],
        ["output", "a_file.txt", "is a file"],
    ),
    ("output-is-a-file", ["align", "{align}", "--output", "{file}"], ["output", "existing file"]),
    (
        "unknown-clip-model",
        ["features", "{features}", "--input", "{images}", "--set", "clip.name=ViT-Q-99"],
        ["clip.name", "'ViT-Q-99'", "did you mean"],
    ),
    ("not-a-feature-cache", ["align", "{align}", "--input", "{empty}"], ["input", "not a feature cache"]),
    (
        "unknown-encoder",
        ["align", "{align}", "--input", "{cache}", "--set", "encoder.name=resnet9000"],
        ["encoder.name", "'resnet9000'", "did you mean"],
    ),
    (
        "batch-not-divisible",
        ["align", "{align}", "--input", "{cache}", "--set", "train.num_workers=3"],
        ["train.batch_size 32", "train.num_workers 3"],
    ),
    (
        "missing-labels-file",
        ["teacher", "{teacher}", "--input", "{root}/AVA.txt", "--set", "aligned=null"],
        ["input", "AVA.txt", "no such label file"],
    ),
    (
        "mismatched-label-format",
        [
            "teacher",
            "{teacher}",
            "--input",
            "{ava}",
            "--set",
            "aligned=null",
            "--set",
            "labels.format=aadb",
            "--set",
            "labels.test_list=null",
        ],
        ["AVA.txt:1", "expected 2 fields"],
    ),
    (
        "missing-aligned-model",
        ["teacher", "{teacher}", "--input", "{ava}", "--set", "aligned={root}/nope", "--set", "labels.test_list=null"],
        ["aligned", "not a model folder"],
    ),
    (
        "missing-scoring-model",
        ["label", "{label}", "--input", "{images}", "--set", "model={empty}"],
        ["empty", "not a model folder"],
    ),
    (
        "evaluate-bad-labels-spec",
        ["evaluate", "--model", "{empty}", "--labels", "imdb:x.txt"],
        ["--labels 'imdb:x.txt'", "ava", "koniq"],
    ),
]


def _fill(arg: str, world: dict[str, str]) -> str:
    stages = {s: str(CONFIGS / f"{s}.yaml") for s in ("features", "align", "teacher", "label")}
    return arg.format(**world, **stages)


def _run(argv: list[str], world: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, float, Path]:
    ray_tmp = tmp_path / "ray-tmp"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cskd_ray.app.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CASE_SECONDS * 2,
    )
    return proc, time.perf_counter() - start, ray_tmp


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_exits_2_with_one_error_line_before_any_work(
    argv: list[str], expected: list[str], world: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    args = [_fill(a, world) for a in argv]
    if args[0] != "evaluate" and "--output" not in args:
        args += ["--output", str(output)]
    proc, seconds, ray_tmp = _run(args, world, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert not output.exists(), "no output may be created"
    assert not ray_tmp.exists(), "Ray must not start"
    assert seconds < CASE_SECONDS


def test_debug_flag_shows_the_traceback(world: dict[str, str], tmp_path: Path) -> None:
    proc, _, ray_tmp = _run(["--debug", "align", _fill("{align}", world), "--set", "loss=l3"], world, tmp_path)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError" in proc.stderr
    assert not ray_tmp.exists()
