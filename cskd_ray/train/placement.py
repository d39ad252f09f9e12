"""Which placement groups a training run's workers hold, so that a Tune sweep can free those of a stopped trial.

Ray Train V2 creates its worker group's placement group from the Train controller, and a placement group lives
as long as the *job* that created it, not the actor. When ASHA stops a trial, Tune ends the trial's actor and
with it the controller, and the workers' placement group stays reserved until the whole sweep's driver exits:
the CPUs it holds never come back and the next trial can wait forever. Ray's own ``PlacementGroupCleaner`` frees
it only when it can ask the dashboard's state API whether the controller is alive (Ray issue 54305), which fails
without a dashboard, and on a machine running several local Rays.

So rank 0 of every (re)started worker group records its placement group in the GCS key-value store under the
run's output URI (:func:`register_placement_group`), and forgets it when the run ends normally; the sweep's
:class:`cskd_ray.stages.tune_release.ReleaseStoppedTrials` callback removes the recorded groups of every trial
that Tune has finished with (:func:`release_placement_groups`). Nothing here needs the dashboard.
"""

from __future__ import annotations

import logging

# A custom resource for the driver of each Tune trial (it only builds and waits on a TorchTrainer), so a trial
# holds no CPU of its own (RAY_NOTES: a trial on a whole CPU next to its Train workers deadlocks 2-core machines).
# A cluster declares it on its head node (ray start --resources='{"trial_driver": 1000}'), a local Ray through
# cskd_ray.app.runtime.init_ray; without it, a trial driver takes 0.01 CPU instead.
TRIAL_DRIVER_RESOURCE = "trial_driver"
TRIAL_DRIVER_SLOTS = 1000  # 0.01 per trial: 100 000 trials at once is no limit

logger = logging.getLogger(__name__)
_PREFIX = "cskd_ray/placement_groups/"


def _key(output: str, group_hex: str = "") -> bytes:
    return f"{_PREFIX}{output.rstrip('/')}/{group_hex}".encode()


def register_placement_group(output: str) -> str | None:
    """In a Train worker: record the placement group this worker runs in under ``output``; return its hex id."""
    from ray.experimental import internal_kv
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is None:
        return None
    group_hex = group.id.hex()
    internal_kv._internal_kv_put(_key(output, group_hex), b"", overwrite=True)
    return group_hex


def forget_placement_group(output: str, group_hex: str | None) -> None:
    """In a Train worker whose run ended normally: Ray Train removes the group itself, drop the record."""
    from ray.experimental import internal_kv

    if group_hex is not None:
        internal_kv._internal_kv_del(_key(output, group_hex))


def release_placement_groups(output: str) -> list[str]:
    """On the driver: remove every recorded placement group of the run(s) writing to ``output``; their hex ids.

    Call it once the run is over (its trial stopped): removing a live run's group ends its workers.
    """
    from ray import PlacementGroupID
    from ray.experimental import internal_kv
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    released = []
    for key in internal_kv._internal_kv_list(_key(output)):
        group_hex = key.decode().rsplit("/", 1)[1]
        group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_hex)))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            released.append(group_hex)
            logger.info("released placement group %s of the stopped run %s", group_hex, output)
        internal_kv._internal_kv_del(key)
    return released
