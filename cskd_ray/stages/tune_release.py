"""The sweep driver's Tune callback that frees the Train placement groups of trials Tune has finished with.

See :mod:`cskd_ray.train.placement` for why Ray leaves them reserved when ASHA stops a trial. A trial's groups are
released a second after Tune completes, stops or errors it (so that Tune has ended the trial's actor first), again
on each later loop step for a minute (a Train controller that restarted its workers meanwhile made a new one), and
once more for every trial when the sweep ends.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from cskd_ray.io import storage
from cskd_ray.stages.tune_results import TRIALS_DIR
from cskd_ray.train.placement import release_placement_groups

WATCH_S = 60.0  # how long after a trial ends its output is still checked for groups to release


class ReleaseStoppedTrials(Callback):
    """Removes the placement groups recorded by the Train workers of trials that are over.

    Args:
        experiment: The sweep's output URI; trial ``t`` trains into ``experiment/trials/t``.
    """

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.ended: dict[str, float] = {}  # trial output → when Tune finished with it
        self.released: list[str] = []  # hex ids of the groups removed, for logs and tests
        self._next_check = 0.0

    def _output(self, trial: Any) -> str:
        return storage.join(self.experiment, TRIALS_DIR, trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial finished or was stopped early (ASHA): release its groups from the next step on."""
        self.ended[self._output(trial)] = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial failed: the same as a stopped one."""
        self.ended[self._output(trial)] = time.monotonic()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Release the groups of trials that ended 1 to ``WATCH_S`` seconds ago (at most once a second)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        for output, ended in list(self.ended.items()):
            if now - ended >= 1.0:
                self.released.extend(release_placement_groups(output))
            if now - ended > WATCH_S:
                del self.ended[output]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Release whatever any trial of the sweep left."""
        for trial in trials:
            self.released.extend(release_placement_groups(self._output(trial)))
        self.ended.clear()
