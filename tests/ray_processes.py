"""Stopping one Ray of several on a machine: the processes of the Ray started with a given temp dir, and only them.

``ray stop`` stops every Ray on the machine (other tests' and other users' too), so the tests that start a Ray
of their own (``ray start --head``, ``ray.cluster_utils.Cluster``) give it a temp dir of its own and stop it here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """``pid: (parent pid, command line)`` of every process, read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def processes_under(temp_dir: Path) -> set[int]:
    """Every process of the Ray under ``temp_dir``: those naming it on their command line, and their descendants."""
    table = _processes()
    found = {pid for pid, (_, cmdline) in table.items() if str(temp_dir) in cmdline}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found - {os.getpid()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_processes_under(temp_dir: Path) -> None:
    """SIGTERM the processes of the Ray under ``temp_dir``, then SIGKILL what is left after 5 s; nothing else."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = processes_under(temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(_alive(pid) for pid in processes_under(temp_dir)):
            return


def patient_node_startup(seconds: float = 240.0) -> None:
    """Give a starting node ``seconds`` (not Ray's fixed 30 s) to register with the GCS, in this process.

    ``ray._private.node.Node`` polls ``services.get_node`` and gives up after a hard-coded 30 s, which a machine
    under heavy load (CI runners shared with other jobs) misses while nothing is wrong. Each poll here retries
    until the node shows up or ``seconds`` pass.
    """
    import ray._private.services as services

    get_node = services.get_node
    if getattr(get_node, "patient", False):
        return

    def patient_get_node(gcs_address: str, node_id: str) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            try:
                return get_node(gcs_address, node_id)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    patient_get_node.patient = True  # type: ignore[attr-defined]
    services.get_node = patient_get_node


if __name__ == "__main__":  # `python tests/ray_processes.py start --head ...`: the ray CLI, patient at startup
    import sys

    from ray.scripts.scripts import main

    patient_node_startup()
    sys.argv[0] = "ray"
    sys.exit(main())
