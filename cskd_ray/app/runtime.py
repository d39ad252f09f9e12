"""Starting or joining Ray, and the console's verbosity, for the CLI and the job entry points.

The library never does either itself.

A local Ray declares the Tune trial drivers' resource (:data:`cskd_ray.train.placement.TRIAL_DRIVER_RESOURCE`).

The console is quiet by default: on the driver, Ray's, Ray Data's and open_clip's INFO lines (open_clip logs to
the root logger) are hidden, while each stage's own progress and summary lines and our warnings show. The
workers' output is still forwarded (Ray Train's step reports and checkpoints, our workers' warnings such as a
damaged checkpoint), unless ``init_ray(quiet=True)`` (the demo, whose stages print one line each).
``--verbose`` shows everything.
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
# Loopback only: Ray turns a node IP of 127.0.0.1 into the machine's own address (``resolve_ip_for_localhost``), so a
# "127.0.0.1" local Ray still registered its node, GCS and workers on the network interface's address (seen:
# 192.0.2.2). With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray keeps 127.0.0.1 (the single-node mode it uses on
# macOS); a local Ray has no other node to reach it.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
THIRD_PARTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "open_clip", "timm", "root")
_console = {"quiet": False}  # set by configure_console (the CLI); a library user's own logging is left alone


def quiet_logs() -> None:
    """Only errors from Ray, Ray Data, Ray Train, Tune, open_clip (it logs to the root logger) and Ray's C++ core.

    No deprecation warnings either. Our own loggers (``cskd_ray.*``) keep their warnings.
    """
    import warnings

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the C++ core's stderr lines
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("cskd_ray").setLevel(logging.WARNING)


def configure_console(verbose: bool) -> None:
    """Log format and levels of a command: quiet (see the module docstring) unless ``verbose``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _console["quiet"] = not verbose
    if not verbose:
        quiet_logs()


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), or start a local Ray.

    A local Ray registers itself on 127.0.0.1 only (:data:`LOCAL_RAY_ENV`), and ignores a stale
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
        ray.init(log_to_driver=not quiet)
        _after_start(quiet)
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
    _after_start(quiet)


def _after_start(quiet: bool) -> None:
    try:
        from ray.data import DataContext

        # Bars on a terminal; in logs (jobs, CI) the stages print their own progress lines instead.
        DataContext.get_current().enable_progress_bars = sys.stderr.isatty() and not quiet
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass
    if _console["quiet"]:
        quiet_logs()  # again: Ray and Ray Data configure their own loggers when Ray starts
