"""Starting or joining Ray, for the CLI and the job entry points (the library never does this itself).

A local Ray declares the Tune trial drivers' resource (:data:`cskd_ray.train.placement.TRIAL_DRIVER_RESOURCE`).
"""

from __future__ import annotations

import logging
import os
import sys

from cskd_ray.train.placement import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS

logger = logging.getLogger(__name__)

# A local Ray's Train settings. The controller polls its workers every HEALTH_CHECK_INTERVAL (2 s by default)
# and waits a few intervals per run (start, each state change, end): 0.25 s took a 2-step run on 2 cores from
# 23-25 s to 19 s. No preemption watcher: a local machine is not a spot instance. A user's own value wins.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), or start a local Ray.

    A local Ray binds to 127.0.0.1 only, starts no dashboard, and ignores a stale
    ``ray_current_cluster`` file left by a killed run (``address="local"``).

    Args:
        num_cpus: Logical CPUs of a local Ray (default: the machine's cores).
        quiet: Do not forward workers' output (Ray Train / open_clip INFO lines) to the driver (the demo's
            default; its stages print one line each).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    for key, value in LOCAL_RAY_ENV.items():  # inherited by the local Ray's processes (the Train controller)
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus or os.cpu_count() or 1,
        resources={TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
        include_dashboard=True,  # Ray Train/Tune clean up placement groups through it (Ray issue 54305)
        dashboard_host="127.0.0.1",
        log_to_driver=not quiet,
        logging_level=logging.ERROR if quiet else logging.WARNING,
    )
    try:
        from ray.data import DataContext

        # Bars on a terminal; in logs (jobs, CI) the stages print their own progress lines instead.
        DataContext.get_current().enable_progress_bars = sys.stderr.isatty() and not quiet
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass
