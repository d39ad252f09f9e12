"""Ray datasets built without start-up work on the cluster.

Tables the driver holds (label lists, planned URIs), and Parquet files whose paths it already knows (feature
cache shards).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def parquet_dataset(paths: Sequence[str], filesystem: Any, columns: list[str], shuffle: Any = None) -> Any:
    """A Ray dataset of ``columns`` of the Parquet files ``paths`` (already listed, e.g. a table's shards).

    ``shuffle`` is read_parquet's (a ``ray.data.FileShuffleConfig``: the files' order drawn per execution).

    Read through Ray Data's V1 Parquet datasource. The V2 one (Ray 2.60's default) provisions a pool of 32
    ``FooterReader`` actors for every listing, even of files whose paths are given: on a 2-core machine each
    2-step align run started about 10 processes instead of 5 and took 21 s instead of 17-20 s. The V1 datasource
    starts a few sampling tasks (to estimate sizes), which reuse Ray's pooled task workers, and no actor.
    """
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(list(paths), filesystem=filesystem, columns=columns, shuffle=shuffle)
    finally:
        context.use_datasource_v2 = previous
