"""Training checkpoints that load without executing pickled code.

A checkpoint directory holds ``model.safetensors`` (the module's state dict), ``optimizer.pt`` and
``scheduler.pt`` (state dicts of tensors and numbers, loaded with ``torch.load(weights_only=True)``),
and ``state.json`` (step, epoch, metrics and the resolved config), plus ``manifest.json``: the size and
sha256 of every other file, written last. Ray Train persists the directory to ``storage_path`` and only
registers it once the upload is complete, but a file can still be damaged later (a truncated copy, a bad
disk, a half-finished manual sync). On every (re)start :func:`latest_valid_checkpoint` checks the
checkpoint Ray hands to the workers against its manifest and, when it is damaged, warns naming it and
falls back to the newest older checkpoint of the same run that verifies.

How Ray Train V2 picks the checkpoint (ray 2.60, ``CheckpointManager``): a new ``fit()`` with the same
``RunConfig(name, storage_path)`` reads ``checkpoint_manager_snapshot.json`` from the run folder, and after a
worker failure the controller keeps its in-memory state; either way ``before_init_train_context`` gives
every worker ``latest_checkpoint_result.checkpoint``, the last one *registered*, with no integrity check.
So the check runs in the worker, and the fallback walks the ``checkpoint_*`` folders beside that one.

Ray writes that snapshot in place (truncate, then write): a driver killed in between leaves it empty, and every
later ``fit()`` of the run then fails in the controller ("Expecting value: line 1 column 1"). Before a run starts,
:func:`repair_run_snapshot` sets such a snapshot aside (``.damaged-<time>``) and names the newest
``checkpoint_*`` folder, which the workers resume from (verified, with the same fallback) when Ray hands them none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's registry of a run's checkpoints

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands: ``step`` optimizer steps done, the epoch they belong to, last metrics."""

    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, state: TrainState, config: dict) -> None:
    """Write a checkpoint directory (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(tensors, str(directory / MODEL_FILE))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    payload = {"step": state.step, "epoch": state.epoch, "metrics": state.metrics or {}, "config": config}
    (directory / STATE_FILE).write_text(json.dumps(payload, indent=2))
    write_manifest(directory)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Write ``manifest.json``: ``{"files": {relative path: {"size": bytes, "sha256": hex}}}`` of every file.

    Call it last, after everything that goes into the checkpoint is written.
    """
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(directory: str | Path) -> str | None:
    """Check a checkpoint directory against its manifest; return None when intact, else what is wrong."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST_FILE}: {exc}"
    if MODEL_FILE not in files or STATE_FILE not in files:
        return f"{MANIFEST_FILE} lists neither {MODEL_FILE} nor {STATE_FILE}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != expected["size"]:
            return f"{name}: {path.stat().st_size} bytes, manifest says {expected['size']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{name}: sha256 differs from the manifest (corrupted)"
    return None


def _older_siblings(checkpoint: Any) -> list[Any]:
    """The run's other ``checkpoint_*`` folders older than ``checkpoint`` (Ray names them by time), newest first."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    names = sorted((posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory), reverse=True)
    return [Checkpoint(posixpath.join(parent, n), checkpoint.filesystem)
            for n in names if n.startswith("checkpoint_") and n < name]


@contextlib.contextmanager
def latest_valid_checkpoint(checkpoint: Any = None) -> Iterator[str | None]:
    """In a Ray Train worker: a local directory of the newest intact checkpoint of this run, or None.

    Starts from ``checkpoint`` (default: ``ray.train.get_checkpoint()``, the latest Ray registered). When
    it fails :func:`verify_checkpoint`, a warning names it and why, and the older checkpoints beside it
    are tried newest first; with none intact, training starts from scratch (also with a warning).
    """
    if checkpoint is None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    bad: list[str] = []
    for candidate in [checkpoint, *_older_siblings(checkpoint)]:
        with candidate.as_directory() as directory:
            problem = verify_checkpoint(directory)
            if problem is None:
                if bad:
                    logger.warning("resuming from the older checkpoint %s instead of the damaged %s",
                                   candidate.path, ", ".join(bad))
                yield directory
                return
        logger.warning("checkpoint %s is damaged: %s; trying the previous one", candidate.path, problem)
        bad.append(candidate.path)
    logger.warning("no intact checkpoint in %s (damaged: %s); training starts from step 0",
                   posixpath.dirname(checkpoint.path), ", ".join(bad))
    yield None


def repair_run_snapshot(run: str) -> str | None:
    """Set aside Ray Train's snapshot in the run folder ``run`` when it is not JSON; return the newest checkpoint.

    Returns the URI of the newest ``checkpoint_*`` folder of the run when the snapshot was damaged (None when it
    is intact, absent, or the run has no checkpoint folder), for the workers to resume from.
    """
    from cskd_ray.io import storage

    snapshot = storage.join(run, SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return None
    data = storage.read_bytes(snapshot)
    try:
        json.loads(data)
        return None
    except ValueError:
        pass
    aside = f"{snapshot}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    storage.write_bytes_once(aside, data, overwrite=True)
    fs, path = storage.resolve(snapshot)
    fs.delete_file(path)
    _, folders = storage.list_top(run)
    newest = max((f for f in folders if posixpath.basename(f).startswith("checkpoint_")), default=None)
    logger.warning("Ray Train's checkpoint registry %s is damaged (%d bytes, not JSON; a run killed while writing "
                   "it); set aside as %s; resuming from the newest checkpoint folder, %s", snapshot, len(data),
                   posixpath.basename(aside), newest or "none: training starts from step 0")
    return newest


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> TrainState:
    """Restore model (and optimizer/scheduler when given) from a checkpoint directory; return its state."""
    directory = Path(directory)
    unwrap(model).load_state_dict(load_file(str(directory / MODEL_FILE)))
    if optimizer is not None and (directory / OPTIMIZER_FILE).exists():
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    if scheduler is not None and (directory / SCHEDULER_FILE).exists():
        scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    payload = json.loads((directory / STATE_FILE).read_text())
    return TrainState(step=int(payload["step"]), epoch=int(payload["epoch"]), metrics=payload.get("metrics"))
