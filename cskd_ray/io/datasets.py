"""Ray datasets of tables the driver already holds (label lists, planned URIs), built without Ray tasks."""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def table_dataset(table: pa.Table, rows_per_block: int) -> Any:
    """A Ray dataset of ``table`` in blocks of ``rows_per_block`` rows, so map steps run in parallel.

    ``ray.data.from_blocks`` puts the blocks in the object store and computes their metadata here.
    ``ray.data.from_arrow`` instead starts one 1-CPU task per block and waits for them: on a cluster whose
    CPUs are held by Train workers or a placement group that is being released, the driver can sit there for
    minutes before training even starts.
    """
    import ray

    step = max(1, rows_per_block)
    blocks = [table.slice(i, step) for i in range(0, len(table), step)] or [table]
    return ray.data.from_blocks(blocks)
