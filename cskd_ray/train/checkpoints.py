"""Training checkpoints that load without executing pickled code.

A checkpoint directory holds ``model.safetensors`` (the module's state dict), ``optimizer.pt`` and
``scheduler.pt`` (state dicts of tensors and numbers, loaded with ``torch.load(weights_only=True)``),
and ``state.json`` (step, epoch, metrics and the resolved config). Ray Train persists the directory to
``storage_path`` and only registers it once the upload is complete, so a restarted run never picks a
half-written checkpoint.
"""

from __future__ import annotations

import json
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
