"""Killed processes: a model actor (table layout), a read task and a writer task (parts layout) killed with SIGKILL
mid-job, and a parts-layout job's driver killed on a running cluster and rerun (the session's ``ray start --head``,
as a user's job on a cluster).

All must end with one row per input, no duplicate, and (for the rerun) only the uncommitted parts computed. The table
layout's rerun after lost shards is tested in tests/stages/test_score.py and test_features.py (partial runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from ray_head import RayHead
from test_adversarial_images import write_scoring_model

from cskd_ray.io.feature_cache import SHARD_PREFIX, FeatureCache, ResultTable
from cskd_ray.stages import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
CONFIGS = REPO / "jobs" / "configs" / "demo"
SMALL_BATCHES = ["batch_size=4", "decode_batch_size=4", "shard_rows=4"]  # many shards: a kill lands mid-job


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 small demo images plus 2 corrupt files: enough batches that a kill lands mid-job."""
    from cskd_ray.io.demo import make_demo_data

    out = tmp_path_factory.mktemp("many")
    make_demo_data(out, 160, labeled_fraction=0.1, seed=1, image_size=32, num_corrupt=2)
    return out / "images"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scoring_model(tmp_path_factory.mktemp("kill-model") / "model")


def _shards(output: Path) -> list[Path]:
    return sorted(output.glob(f"{SHARD_PREFIX}*.parquet")) if output.exists() else []


def _actor_pids(class_name: str) -> set[int]:
    """Pids of the session Ray's worker processes running ``class_name`` (an actor class or a task's function).

    The session's Ray was started by this process (``ray.init(address="local")``): its raylet and workers are our
    descendants, so no other Ray on the machine is touched.
    """
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if class_name in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:
            continue
    return pids


def _table(stage: str, output: Path):
    if stage == "features":
        return FeatureCache(str(output)).read()
    from cskd_ray.io.feature_cache import LABEL_SCHEMA

    return ResultTable(str(output), LABEL_SCHEMA).read()


def _assert_every_input_once(stage: str, output: Path, images: Path) -> None:
    uris = _table(stage, output).column("uri").to_pylist()
    assert len(uris) == len(set(uris)), "no duplicate rows"
    assert sorted(uris) == sorted(str(p) for p in images.iterdir()), "every input has its row"


# label's model actor (table layout; features runs the same row_pipeline, so this covers its actor restart too).
# The parts layout's read task is killed mid-part: Ray runs it again (had it handed rows on already, they would
# arrive twice; the driver counts each row once and the commit keeps one copy).
@pytest.mark.parametrize(("process", "layout"), [("ScoreActor", "table"), ("read_part_batches", "parts")])
def test_killed_model_actor_mid_job_loses_and_duplicates_nothing(
    ray_session, many_images: Path, model_dir: Path, tmp_path: Path, process: str, layout: str
) -> None:
    from cskd_ray.io.part_pass import committed_parts
    from cskd_ray.stages.label import run as run_label

    output = tmp_path / "label"
    cfg = _label_config(many_images, model_dir, output, layout)
    killed: list[int] = []

    def rows_written() -> int:
        if layout == "parts":
            return 40 * len(committed_parts(str(output))) if output.exists() else 0
        return len(_shards(output)) * 4

    def kill_after_first_rows() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            early = process == "read_part_batches"  # a read task runs once per part: kill the first one
            if (early or rows_written()) and (pids := _actor_pids(process)):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
                killed.append(rows_written())  # rows written when the process died
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_first_rows, daemon=True)
    watcher.start()
    result = run_label(cfg)
    watcher.join(timeout=5)
    assert killed, f"the {process} process was killed"
    assert killed[-1] < 162, "the kill landed before the last row was written"
    assert result.new_rows == 162
    _assert_every_input_once("label", output, many_images)
    if layout == "parts":
        assert sorted(committed_parts(str(output))) == list(range(5))


def test_a_writer_task_killed_after_its_attempt_file_is_written_loses_and_duplicates_nothing(
    ray_session, many_images: Path, model_dir: Path, tmp_path: Path
) -> None:
    """The parts layout's writer task dies (SIGKILL, by tests/fault_injection.py) right after writing part 2's rows
    under ``_attempts/`` and before its task returns: Ray runs it again, so part 2 has two attempt files holding the
    same rows; the driver counts each row once and the commit keeps one copy."""
    import psutil  # Ray's vendored copy (importing ray puts it on the path)
    from fault_injection import armed_fault

    from cskd_ray.io.part_pass import ATTEMPTS, committed_parts
    from cskd_ray.stages.label import run as run_label

    output = tmp_path / "label"
    with armed_fault(f"/{ATTEMPTS}/part-000002/") as fired:
        result = run_label(_label_config(many_images, model_dir, output, "parts"))
    assert fired.exists(), "a writer task wrote part 2's rows and was killed"
    victim = json.loads(fired.read_text())
    assert not psutil.pid_exists(victim["pid"]) or psutil.Process(victim["pid"]).status() == psutil.STATUS_ZOMBIE
    assert "part-000002" in victim["uri"]
    assert result.new_rows == 162
    _assert_every_input_once("label", output, many_images)
    assert sorted(committed_parts(str(output))) == list(range(5))


def _label_config(many_images: Path, model_dir: Path, output: Path, layout: str):
    overrides = [*SMALL_BATCHES, f"layout={layout}", "part_rows=40", f"model={model_dir}"]
    return load_config("label", CONFIGS / "label.yaml", overrides, input_uris=[str(many_images)],
                       output_uri=str(output))


def _cli(
    stage: str, many_images: Path, output: Path, model_dir: Path, tmp_path: Path, head: RayHead,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "cskd_ray.app.cli",
        stage,
        str(CONFIGS / f"{stage}.yaml"),
        "--input",
        str(many_images),
        "--output",
        str(output),
    ]
    for item in [*SMALL_BATCHES, *([f"model={model_dir}"] if stage == "label" else []), *extra]:
        args += ["--set", item]
    return subprocess.Popen(
        args,
        env=head.driver_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_killed_driver_of_a_parts_pass_rerun_redoes_only_uncommitted_parts(
    ray_head: RayHead, many_images: Path, model_dir: Path, tmp_path: Path
) -> None:
    """The parts layout (a WebDataset tar of the same images): SIGKILL the driver once two parts are committed; the
    rerun trusts the committed parts only, and every tar member ends with exactly one row."""
    from sample_collections import write_webdataset_tar

    from cskd_ray.io.part_pass import committed_parts, read_marker

    files = sorted(many_images.iterdir())
    tar = write_webdataset_tar(tmp_path / "00000.tar", [(p.stem, ".jpg", p.read_bytes()) for p in files])
    output = tmp_path / "labels"
    extra = ("layout=parts", "part_rows=16")
    first = _cli("label", tar, output, model_dir, tmp_path, ray_head, extra)
    deadline = time.monotonic() + 240
    while (len(committed_parts(str(output))) < 2 if output.exists() else True) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the job was still running when killed"
    committed = committed_parts(str(output))
    done_before = sum(read_marker(str(output), p)["rows"] for p in committed)
    assert 2 <= len(committed) < 11 and 0 < done_before < 162
    second = _cli("label", tar, output, model_dir, tmp_path, ray_head, extra)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    uris = _table("label", output).column("uri").to_pylist()
    assert sorted(uris) == sorted(f"{tar}#{p.stem}.jpg" for p in files), "every member exactly once"
    summary = next(line for line in out.splitlines() if line.startswith("label: 162 images"))
    assert f"{done_before} already" in summary and f"{162 - done_before} new rows" in summary, summary
    assert sorted(committed_parts(str(output))) == list(range(11))
