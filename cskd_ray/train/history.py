"""Rank 0's training history: one JSON record per optimizer step, kept across restarts, mirrored to TensorBoard.

A record is ``{"step": s, "epoch": e, <metric>: value, ...}``: the loss terms the task returned (means over
the global batch), ``lr``, and the ``val_*`` metrics on the steps where the stage validated. The history
travels inside every checkpoint (``history.jsonl``), so a resumed run continues the same history instead
of starting a new one; the first step after a restart carries ``"resumed_from": k``, the step of the
checkpoint it restarted from (a worker killed and restarted, or a stopped run rerun). After each checkpoint
the history is published to the stage's output:

* ``OUTPUT/metrics.jsonl``: the whole history, rewritten atomically (the report's training curves);
* ``OUTPUT/tensorboard/``: TensorBoard event files (``tensorboard --logdir OUTPUT --host 127.0.0.1``).
  Local outputs are written in place; for ``s3://`` outputs the events are written to a local folder and
  copied after each checkpoint. A resumed writer purges events past the restored step, so steps that were
  logged after the last checkpoint and then recomputed are not shown twice.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cskd_ray.io import storage

HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_history(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines into records (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _jsonable(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN/inf


class TrainingHistory:
    """Per-step metrics of rank 0, restored from a checkpoint, published to ``output`` after each checkpoint.

    Args:
        output: The stage's output URI (local or ``s3://``); None keeps the history only in checkpoints.
        enabled: False on ranks other than 0: every method is then a no-op.
    """

    def __init__(self, output: str | None, enabled: bool = True) -> None:
        self.output, self.enabled = output, enabled and output is not None
        self.records: list[dict[str, Any]] = []
        self._writer: Any = None
        self._local_events: str | None = None
        self._purge_step: int | None = None
        self._resumed_from: int | None = None

    def restore(self, directory: str | Path, step: int) -> None:
        """Load the history saved in a checkpoint directory, keeping the records up to ``step``."""
        path = Path(directory) / HISTORY_FILE
        if self.enabled and path.exists():
            self.records = [r for r in read_history(path.read_text()) if r["step"] <= step]
        self._purge_step, self._resumed_from = step + 1, step

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Add metrics at ``step``: merged into that step's record when it exists (validation), else appended."""
        if not self.enabled:
            return
        values = {k: _jsonable(v) for k, v in metrics.items()}
        if self.records and self.records[-1]["step"] == step:
            self.records[-1].update(values)
        else:
            resumed = {} if self._resumed_from is None else {"resumed_from": self._resumed_from}
            self.records.append({"step": step, "epoch": epoch, **values, **resumed})
            self._resumed_from = None
        writer = self._tensorboard()
        for name, value in values.items():
            if value is not None:
                writer.add_scalar(_tag(name), value, global_step=step)

    def save(self, directory: str | Path) -> None:
        """Write ``history.jsonl`` into a checkpoint directory being assembled."""
        if self.enabled:
            (Path(directory) / HISTORY_FILE).write_text(_jsonl(self.records))

    def publish(self) -> None:
        """Write ``OUTPUT/metrics.jsonl`` and flush (and for s3:// outputs copy) the TensorBoard events."""
        if not self.enabled:
            return
        storage.write_text_once(storage.join(self.output, METRICS_FILE), _jsonl(self.records), overwrite=True)
        if self._writer is not None:
            self._writer.flush()
            if self._local_events is not None:
                for path in sorted(Path(self._local_events).rglob("*")):
                    if path.is_file():
                        target = storage.join(self.output, TENSORBOARD_DIR, *path.relative_to(self._local_events).parts)
                        storage.write_bytes_once(target, path.read_bytes(), overwrite=True)

    def close(self) -> None:
        """Close the TensorBoard writer (and drop the local copy of an ``s3://`` output's events)."""
        if self._writer is not None:
            self._writer.close()
        if self._local_events is not None:
            shutil.rmtree(self._local_events, ignore_errors=True)

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if storage.is_remote(self.output):
                self._local_events = tempfile.mkdtemp(prefix="cskd-tensorboard-")
                logdir = self._local_events
            else:
                logdir = storage.resolve(storage.join(self.output, TENSORBOARD_DIR))[1]
            self._writer = SummaryWriter(logdir, purge_step=self._purge_step, flush_secs=30)
        return self._writer


def _tag(name: str) -> str:
    """TensorBoard tag: ``val_srcc`` → ``val/srcc``, ``lr`` → ``train/lr``, ``loss`` → ``train/loss``."""
    return f"val/{name.removeprefix('val_')}" if name.startswith("val_") else f"train/{name}"


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
