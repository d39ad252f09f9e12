"""The validation split in a Train worker: one Ray Data pass, then memory when it fits (train/validation.py)."""

from __future__ import annotations

import torch

from cskd_ray.train.validation import ValidationBatches, batch_bytes


class _Shard:
    """A ``val`` shard: 10 rows of 4x4x3 uint8 pixels and a score, in batches; counts its executions."""

    def __init__(self) -> None:
        self.executions = 0

    def iter_torch_batches(self, batch_size: int, device: str):
        assert device == "cpu"  # cached batches stay on CPU
        self.executions += 1
        for start in range(0, 10, batch_size):
            rows = torch.arange(start, min(start + batch_size, 10))
            yield {"pixels": torch.full((len(rows), 4, 4, 3), start, dtype=torch.uint8), "score": rows.float()}


def _scores(batches) -> list[float]:
    return [float(s) for batch in batches for s in batch["score"]]


def test_a_split_that_fits_is_read_once_and_then_served_from_memory() -> None:
    shard = _Shard()
    validation = ValidationBatches(shard, 4, torch.device("cpu"), budget_bytes=1 << 20)
    first, second, third = _scores(validation), _scores(validation), _scores(validation)
    assert first == second == third == [float(i) for i in range(10)]
    assert shard.executions == validation.passes == 1


def test_a_split_over_the_budget_or_with_caching_off_streams_at_every_check() -> None:
    one_batch = batch_bytes({"pixels": torch.zeros(4, 4, 4, 3, dtype=torch.uint8), "score": torch.zeros(4)})
    for budget in (one_batch * 2, 0):  # 3 batches do not fit in 2; 0 turns the cache off
        shard = _Shard()
        validation = ValidationBatches(shard, 4, torch.device("cpu"), budget_bytes=budget)
        assert _scores(validation) == _scores(validation) == [float(i) for i in range(10)]
        assert shard.executions == 2 and validation.cached is None


def test_an_interrupted_pass_is_not_cached() -> None:
    shard = _Shard()
    validation = ValidationBatches(shard, 4, torch.device("cpu"), budget_bytes=1 << 20)
    next(iter(validation))  # a check that failed after its first batch
    assert validation.cached is None
    assert _scores(validation) == [float(i) for i in range(10)] and shard.executions == 2
    assert _scores(validation) == [float(i) for i in range(10)] and shard.executions == 2
