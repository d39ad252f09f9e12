"""What a ``TorchTrainer`` carries to its controller and workers: the worker entry point and the task factory.

Ray pickles both by reference into the Train controller as well as the workers. Only the workers train, so
this module imports nothing heavy: the training loop (torch) and the stage's task class (torch, timm,
open_clip) are imported when a worker calls them. A controller that unpickled ``functools.partial(AlignTask)``
instead imported the whole model stack for nothing, once per training run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskFactory:
    """Builds a stage's task from the stage config, in the worker: ``module.name(stage, **kwargs)``.

    Attributes:
        module: Module of the task class, e.g. ``cskd_ray.train.align``.
        name: The task class, e.g. ``AlignTask``.
        kwargs: Keyword arguments after the stage config (plain, picklable values).
    """

    module: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, stage: dict) -> Any:
        """The task (an ``nn.Module``) for ``stage``."""
        return getattr(importlib.import_module(self.module), self.name)(stage, **self.kwargs)


def train_worker_loop(loop_config: dict) -> None:
    """Ray Train ``train_loop_per_worker``: see :func:`cskd_ray.train.common.run_worker_loop`."""
    from cskd_ray.train.common import run_worker_loop

    run_worker_loop(loop_config)
