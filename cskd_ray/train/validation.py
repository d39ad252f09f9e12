"""The validation split inside a Train worker: streamed from Ray Data once, then kept in memory when it fits.

Each worker validates on the whole ``val`` dataset at every checkpoint that validates (each epoch's end and the last
step). Without a cache every check re-reads and re-decodes every validation image through a new Ray Data execution;
a validation split is usually small (the AVA recipe's is ~5% of the labels), so after the first full pass its
batches (uint8 pixels and a few label columns, on CPU) stay in the worker's memory when they fit in the budget
(``train.val_cache_mb``). A split over the budget streams at every check as before. Metrics do not depend on it:
the same rows are validated either way, and the metrics do not depend on row order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def batch_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a batch's tensors."""
    return sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))


class ValidationBatches:
    """The ``val`` shard's batches for each validation, from memory after the first complete pass if they fit.

    Args:
        shard: The worker's ``val`` dataset shard (``ray.train.get_dataset_shard("val")``).
        batch_size: Rows per batch.
        device: Where the task runs; cached batches stay on CPU and are moved per batch.
        budget_bytes: Largest cache; 0 turns caching off.
    """

    def __init__(self, shard: Any, batch_size: int, device: torch.device, budget_bytes: int) -> None:
        self.shard, self.batch_size, self.device, self.budget_bytes = shard, batch_size, device, budget_bytes
        self.cached: list[dict[str, Any]] | None = None
        self.fits = budget_bytes > 0  # False once a pass has gone over the budget: later passes keep nothing
        self.passes = 0  # Ray Data executions of the split so far

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.cached is not None:
            for batch in self.cached:
                yield self._to_device(batch)
            return
        self.passes += 1
        kept: list[dict[str, Any]] | None = [] if self.fits else None
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, device="cpu"):
            if kept is not None:
                size += batch_bytes(batch)
                if size <= self.budget_bytes:
                    kept.append(batch)
                else:
                    kept, self.fits = None, False  # over budget: stream at every check
            yield self._to_device(batch)
        self.cached = kept  # only a complete pass is cached

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
