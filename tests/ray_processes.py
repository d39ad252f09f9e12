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


def own_ray_env(token_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a Ray of our own (``ray start``, ``Cluster``) and of its drivers: this process's
    environment without its ``RAY_*`` settings, token auth with a new token in ``token_dir``, no hub, and the
    test session's Train settings. ``extra`` adds or overrides variables."""
    import secrets

    token_file = token_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "HF_HUB_OFFLINE": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            # Ray's memory monitor kills workers when the *machine* is nearly full, whoever uses the memory: on a
            # shared CI box other processes' memory would fail these tests' training stages (max_failures 0).
            "RAY_memory_monitor_refresh_ms": "0",
            # as tests/conftest.py sets for the session's Ray: Train controllers poll every 0.25 s, not 2 s
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # 127.0.0.1, not the machine's address (tests/conftest.py)
            **extra,
        }
    )
    return env


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
