"""Starting or joining Ray, for the CLI and the job entry points (the library never does this itself)."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

# A custom resource for the driver of each Tune trial (it only builds and waits on a TorchTrainer), so a trial
# holds no CPU of its own (RAY_NOTES: a trial on a whole CPU next to its Train workers deadlocks 2-core machines).
# A cluster declares it on its head node (ray start --resources='{"trial_driver": 1000}'); without it, a trial
# driver takes 0.01 CPU instead.
TRIAL_DRIVER_RESOURCE = "trial_driver"
TRIAL_DRIVER_SLOTS = 1000  # 0.01 per trial: 100 000 trials at once is no limit


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), or start a local Ray.

    A local Ray binds to 127.0.0.1 only, starts no dashboard, and ignores a stale
    ``ray_current_cluster`` file left by a killed run (``address="local"``).

    Args:
        num_cpus: Logical CPUs of a local Ray (default: the machine's cores).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus or os.cpu_count() or 1,
        resources={TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
        include_dashboard=True,  # Ray Train/Tune clean up placement groups through it (Ray issue 54305)
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    try:
        from ray.data import DataContext

        # Bars on a terminal; in logs (jobs, CI) the stages print their own progress lines instead.
        DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass
