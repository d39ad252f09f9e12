"""A ``ray start --head`` of our own for the tests that need a real cluster head: loopback, its own ports and temp
dir, token auth on.

The head is stopped by killing exactly the processes it started (found by its temp dir), never ``ray stop``,
which would stop every Ray on the machine. Its token lives in the temp dir (``RAY_AUTH_TOKEN_PATH``), so the
user's ``~/.ray/auth_token`` is neither read nor written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ray_processes import own_ray_env, stop_processes_under

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNTIME_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}


def _free_port(outside: range = range(10002, 20000)) -> int:
    """A free loopback port outside ``outside`` (Ray's worker port range by default)."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in outside:
            return port


@dataclass
class RayHead:
    """A running ``ray start --head`` and the environment its clients need (token auth)."""

    address: str  # the dashboard (Jobs API) URL
    gcs_address: str  # what a driver joins: RAY_ADDRESS=127.0.0.1:PORT
    temp_dir: Path
    env: dict[str, str]

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver (``cskd-ray STAGE ...``) that joins this head instead of starting a Ray."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``ray`` CLI against this head."""
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def submit(self, submission_id: str, *entrypoint: str, timeout: float = 1500) -> str:
        """``ray job submit --no-wait --working-dir .`` (the CLI users run), then the job's status from the Jobs REST
        API every second until it ends; its final status (``SUCCEEDED``, ``FAILED`` or ``STOPPED``)."""
        done = self.ray(
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            submission_id,
            "--no-wait",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(RUNTIME_ENV),
            "--",
            *entrypoint,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + timeout
        status = "not answered yet"
        while True:
            with contextlib.suppress(OSError):  # a busy head may miss one poll; the deadline bounds the wait
                status = self.api(f"/api/jobs/{submission_id}")["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{submission_id} did not finish in {timeout} s: {status}")
            time.sleep(1)

    def logs(self, submission_id: str) -> str:
        """The job's whole output (what ``ray job logs`` prints)."""
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def api(self, path: str) -> dict:
        """GET ``path`` of the head's Jobs REST API with its token (a ``ray`` CLI call costs a Python start-up)."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - the loopback head only
            return json.loads(response.read())


def _start_head(temp_dir: Path) -> RayHead:
    """``ray start --head`` on 127.0.0.1: 2 CPUs, its own ports, ``temp_dir`` and token; waits for the Jobs API."""
    env = own_ray_env(temp_dir)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    dashboard = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }
    head = RayHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{ports['--port']}", temp_dir, env)
    started = subprocess.run(  # the ray CLI, patient while a loaded machine registers the node (ray_processes.py)
        [
            sys.executable,
            str(REPO / "tests" / "ray_processes.py"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            '--resources={"trial_driver": 1000}',
            *(f"{k}={v}" for k, v in ports.items()),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    if started.returncode != 0:
        raise RuntimeError(started.stdout + started.stderr)
    deadline = time.monotonic() + 120
    while True:  # the Jobs API answers once the dashboard is up
        try:
            with urllib.request.urlopen(f"{head.address}/api/version", timeout=5):
                return head
        except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
            return head
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@contextlib.contextmanager
def running_head() -> Iterator[RayHead]:
    """A head of our own, stopped by its own pids. Ray gives a raylet 30 s to register with the GCS, which a
    heavily loaded machine can miss: then that head is stopped and another started (3 tries)."""
    temp_dirs: list[Path] = []
    try:
        for attempt in range(3):
            temp_dirs.append(Path(tempfile.mkdtemp(prefix="cskdh", dir="/tmp")))  # short: socket paths ≤ 107 bytes
            try:
                head = _start_head(temp_dirs[-1])
                break
            except RuntimeError:
                stop_processes_under(temp_dirs[-1])
                if attempt == 2:
                    raise
        yield head
    finally:
        for temp_dir in temp_dirs:
            stop_processes_under(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
