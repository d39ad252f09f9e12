"""Training resumed after a stop, past a damaged latest checkpoint, and after a Train worker killed with SIGKILL.

All runs align test_vit to the session's feature cache with ordered ingest (``train.deterministic``) and the
default shuffle (a seeded shuffle per epoch), so a run that recovers correctly, skipping exactly the batches it
had done, ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from cskd_ray.stages import load_config
from cskd_ray.stages.align import run as run_align
from cskd_ray.train.checkpoints import MANIFEST_FILE, MODEL_FILE, STATE_FILE, verify_checkpoint, write_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
STEPS = 6  # 60 images // 16 = 3 steps per epoch, 2 epochs


def _align(cache: str, output: Path, *overrides: str):
    base = [
        "train.batch_size=16",
        "train.epochs=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.deterministic=true",
        "train.lr=0.01",
        "decode_batch_size=8",
        "train.keep_checkpoints=3",
    ]
    cfg = load_config(
        "align",
        REPO / "jobs" / "configs" / "demo" / "align.yaml",
        [*base, *overrides],
        input_uris=[cache],
        output_uri=str(output),
    )
    return run_align(cfg)


@pytest.fixture(scope="module")
def straight(feature_cache: str, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run: the reference for every recovered run."""
    output = tmp_path_factory.mktemp("straight")
    result = _align(feature_cache, output)
    assert result.steps == STEPS and result.rows == 60
    description = json.loads((output / "model" / "model.json").read_text())
    assert description["step"] == STEPS and description["clip"]["random_weights"] is True
    assert 0.0 <= description["metrics"]["loss"] <= 2.0 and -1.0 <= description["metrics"]["cosine"] <= 1.0
    assert _checkpoints(output), "checkpoints are kept under output/train"
    return result, load_file(str(output / "model" / MODEL_FILE))


def _checkpoints(output: Path) -> list[Path]:
    return sorted(p for p in (output / "train").glob("checkpoint_*") if (p / MANIFEST_FILE).exists())


def _history(output: Path) -> list[dict]:
    from cskd_ray.train.history import read_history

    return read_history((output / "metrics.jsonl").read_text())


def _worker_logs() -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.suffix in (".out", ".err"))


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:  # CPU, fixed seed, ordered ingest: equal up to float rounding
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_manifest_detects_truncation_corruption_and_a_missing_manifest(tmp_path: Path) -> None:
    from cskd_ray.train.checkpoints import TrainState, save_checkpoint

    model = torch.nn.Linear(4, 3)
    save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), None, TrainState(step=2), {})
    assert verify_checkpoint(tmp_path) is None
    weights = tmp_path / MODEL_FILE
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    assert "truncated" in verify_checkpoint(tmp_path)
    weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))  # same size, one byte flipped
    assert "sha256 differs" in verify_checkpoint(tmp_path)
    weights.write_bytes(intact)
    (tmp_path / "extra.json").write_text("{}")
    write_manifest(tmp_path)  # files added after save_checkpoint are covered by a second manifest
    assert verify_checkpoint(tmp_path) is None
    (tmp_path / "extra.json").write_text("{ }")
    assert "extra.json" in verify_checkpoint(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    assert verify_checkpoint(tmp_path) == f"no {MANIFEST_FILE}"


def _train_worker_pids() -> set[int]:
    """Pids of this Ray node's Train worker processes (children of our raylet, not other sessions')."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    pids = set()
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_worker_then_a_stopped_run_resume_past_a_damaged_checkpoint_to_the_same_weights(
    feature_cache: str, straight, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two failures in one run's life, each recovered from a checkpoint, ending on the uninterrupted run's weights.

    1. The Train worker is SIGKILLed once Ray Train has registered its first checkpoint; FailureConfig restarts it
       there. The run stops after step 5 (checkpoints at 2, 4 and 5), as if its driver had been killed. Its history
       proves the kill landed mid-training: exactly one restart (``resumed_from`` k, 2 <= k < 5) and steps 1..5
       each once.
    2. The latest checkpoint (step 5) is damaged, and so is Ray Train's checkpoint registry (empty, as a driver
       killed while Ray rewrites it leaves it), and the run is started again: it resumes from the newest intact
       checkpoint (4, not 2: mid-epoch, so it skips the epoch's first batch) and ends at step 6, with steps 1..6
       each once.

    Tolerance: weights within rtol 1e-4 / atol 1e-5 of the uninterrupted run, and the final loss within 1e-4
    (ordered ingest, a seeded shuffle and seeded CPU maths make the recovered runs repeat the same steps).
    """
    output = tmp_path / "run"
    killed: list[int] = []
    registered = output / "train" / "checkpoint_manager_snapshot.json"  # written once the controller registers one

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if registered.exists() and (pids := _train_worker_pids()):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    first = _align(feature_cache, output, "train.max_failures=1", "train.max_steps=5")
    watcher.join(timeout=5)
    assert killed, "the worker was killed"
    assert first.steps == 5 and first.rows == 60
    history = _history(output)
    assert [r["step"] for r in history] == list(range(1, 6)), "each step once, none missing"
    restarts = [r["resumed_from"] for r in history if "resumed_from" in r]
    assert len(restarts) == 1 and 2 <= restarts[0] < 5, f"one restart, mid-training: {restarts}"

    older, latest = _checkpoints(output)[-2:]
    assert '"step": 5' in (latest / STATE_FILE).read_text() and '"step": 4' in (older / STATE_FILE).read_text()
    weights = latest / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: loading it would raise
    registered.write_bytes(b"")  # Ray Train's own registry, cut short mid-write: its controller could not start
    resumed = _align(feature_cache, output)
    assert "checkpoint registry" in caplog.text and "is damaged" in caplog.text
    assert list(registered.parent.glob("checkpoint_manager_snapshot.json.damaged-*"))
    assert resumed.steps == STEPS
    history = _history(output)
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    # the kill's restart stays in the history when it resumed before step 4 (the rerun keeps steps <= 4)
    kept = [(restarts[0] + 1, restarts[0])] if restarts[0] < 4 else []
    assert [(r["step"], r["resumed_from"]) for r in history if "resumed_from" in r] == [*kept, (5, 4)]
    logs = _worker_logs()
    assert f"checkpoint {latest} is damaged: {MODEL_FILE}" in logs, "the warning names the damaged checkpoint"
    assert f"resuming from the older checkpoint {older}" in logs
    states = [(p / STATE_FILE).read_text() for p in _checkpoints(output)]
    assert any(f'"step": {STEPS}' in s for s in states)
    assert abs(resumed.metrics["loss"] - straight[0].metrics["loss"]) <= 1e-4
    _assert_same_weights(load_file(str(output / "model" / MODEL_FILE)), straight[1])
