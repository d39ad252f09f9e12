"""Precision and CPU threads for model code (feature and scoring actors, training workers)."""

from __future__ import annotations

import os
from typing import Any

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device_type: str, precision: str) -> Any:
    """The autocast context for ``precision``: ``auto`` is fp16 on CUDA and fp32 (no autocast) on CPU."""
    resolved = ("fp16" if device_type == "cuda" else "fp32") if precision == "auto" else precision
    dtype = _DTYPES.get(resolved)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def set_cpu_threads(torch_threads: int, actors: int) -> None:
    """Give torch ``torch_threads`` threads, or (0) the node's cores shared by ``actors``.

    Ray pins OMP threads to an actor's ``num_cpus``; CPU inference wants the node's cores.
    """
    torch.set_num_threads(torch_threads or max(1, (os.cpu_count() or 1) // actors))
