"""The Ray Jobs path for real: a ``ray start --head`` of our own (loopback, own ports and temp dir, token auth on),
``ray job submit --working-dir .`` of ``jobs/pipeline.py``, and stage jobs whose inputs are missing.

The head is stopped by killing exactly the processes it started (found by its temp dir), never ``ray stop``,
which would stop every Ray on the machine. Its token lives in the temp dir (``RAY_AUTH_TOKEN_PATH``), so the
user's ``~/.ray/auth_token`` is neither read nor written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
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

import pytest
from ray_processes import stop_processes_under

from cskd_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAINING_STAGES = ("align_teacher", "align_student", "teacher", "distill")
RUNTIME_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}}

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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
    temp_dir: Path
    env: dict[str, str]

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
        """``ray job submit --no-wait --working-dir .``, then ``ray job logs -f`` until it ends; its final status."""
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
        with contextlib.suppress(subprocess.TimeoutExpired):  # follows the output; returns when the job ends
            self.ray("job", "logs", "--address", self.address, "-f", submission_id, timeout=timeout)
        while True:  # `ray job status` ends with "Job 'ID' succeeded" (or "Status for job 'ID': RUNNING")
            status = self.ray("job", "status", "--address", self.address, submission_id).stdout
            final = re.search(rf"Job '{re.escape(submission_id)}' (succeeded|failed|stopped)", status)
            if final:
                return final.group(1).upper()
            if time.monotonic() > deadline:
                raise AssertionError(f"{submission_id} did not finish in {timeout} s:\n{status}")
            time.sleep(2)

    def logs(self, submission_id: str) -> str:
        """``ray job logs``: the job's whole output."""
        return self.ray("job", "logs", "--address", self.address, submission_id).stdout


def _start_head(temp_dir: Path) -> RayHead:
    """``ray start --head`` on 127.0.0.1: 2 CPUs, its own ports, ``temp_dir`` and token; waits for the Jobs API."""
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            # Ray's memory monitor kills workers when the *machine* is nearly full, whoever uses the memory: on a
            # shared CI box other processes' memory would fail this test's training stages (max_failures 0).
            "RAY_memory_monitor_refresh_ms": "0",
        }
    )
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
    head = RayHead(f"http://127.0.0.1:{dashboard}", temp_dir, env)
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


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
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


def _pipeline_args(tmp: Path) -> list[str]:
    """The demo pipeline, tiny: 60 images, 2 steps per training stage, everything under ``tmp``."""
    data, steps = tmp / "data", "train.max_steps=2"
    sets = [
        f"demo_data.output={data}",
        "demo_data.num_images=60",
        f"input=[{data}/unlabeled.csv]",
        f"label_file={data}/AVA.txt",
        f"labels.images_root={data}/images",
        f"labels.test_list={data}/test.jpgl",
        f"score_input=[{data}/images]",
        f"stages.align_teacher.set=[encoder.name=test_vit2, {steps}]",
        f"stages.align_student.set=[{steps}]",
        f"stages.teacher.set=[{steps}, train.batch_size=8]",
        f"stages.distill.set=[{steps}, train.batch_size=8]",
    ]
    return [
        "python",
        "jobs/pipeline.py",
        "jobs/configs/demo/pipeline.yaml",
        "--output",
        str(tmp / "run"),
        *(arg for item in sets for arg in ("--set", item)),
    ]


@pytest.mark.timeout(3600)  # the first run alone took 683 s on a 2-core machine at load average ~70
def test_pipeline_job_runs_every_stage_then_skips_complete_ones(ray_head: RayHead, tmp_path: Path) -> None:
    from cskd_ray.feature_cache import ResultTable
    from cskd_ray.labeling import LABEL_SCHEMA

    args, run = _pipeline_args(tmp_path), tmp_path / "run"
    assert ray_head.submit("cskd-pipeline-1", *args) == "SUCCEEDED", ray_head.logs("cskd-pipeline-1")[-4000:]
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == dict.fromkeys(
        ("features", *TRAINING_STAGES[:3], "label", "distill", "evaluate", "score"), "ran"
    )
    for folder in ("align-teacher", "align-student", "teacher", "student"):
        assert (run / folder / "model" / "model.json").is_file(), folder
    for folder in ("features", "pseudo-labels", "scores"):
        assert (run / folder / "_meta.json").is_file(), folder
    for which in ("teacher", "student"):
        assert "srcc" in json.dumps(json.loads((run / f"evaluate-{which}" / "metrics.json").read_text()))
    images = sorted(str(p) for p in (tmp_path / "data" / "images").iterdir())
    scores = ResultTable(str(run / "scores"), LABEL_SCHEMA).read(["uri", "score", "error"]).to_pydict()
    assert sorted(scores["uri"]) == images  # one row per input image, no duplicates, corrupt ones as error rows
    errors = [e for e in scores["error"] if e]
    assert 0 < len(errors) < len(images)
    assert "pipeline: done" in ray_head.logs("cskd-pipeline-1")

    assert ray_head.submit("cskd-pipeline-2", *args) == "SUCCEEDED", ray_head.logs("cskd-pipeline-2")[-4000:]
    again = json.loads((run / "pipeline_summary.json").read_text())["stages"]
    assert {name: again[name]["status"] for name in (*TRAINING_STAGES, "evaluate")} == dict.fromkeys(
        (*TRAINING_STAGES, "evaluate"), "complete"
    )
    for name in ("features", "label", "score"):  # the image passes resume: nothing left to compute
        assert again[name]["status"] == "ran"
    logs = ray_head.logs("cskd-pipeline-2")
    assert all(f"pipeline: {name}: already complete, skipped" in logs for name in TRAINING_STAGES)
    rescored = ResultTable(str(run / "scores"), LABEL_SCHEMA).read(["uri"]).to_pydict()["uri"]
    assert sorted(rescored) == images


def test_stage_job_with_missing_inputs_fails_naming_the_stage_to_run_first(
    ray_head: RayHead, tmp_path: Path, demo_data: Path
) -> None:
    (tmp_path / "empty").mkdir()
    job = [
        "python",
        "jobs/teacher.py",
        "jobs/configs/demo/teacher.yaml",
        "--output",
        str(tmp_path / "teacher"),
        "--input",
        str(demo_data / "AVA.txt"),
        "--set",
        f"labels.images_root={demo_data / 'images'}",
        "--set",
        f"labels.test_list={demo_data / 'test.jpgl'}",
        "--set",
        f"aligned={tmp_path / 'empty'}",
    ]
    assert ray_head.submit("cskd-teacher-missing", *job, timeout=300) == "FAILED"
    logs = ray_head.logs("cskd-teacher-missing")
    assert f"error: aligned {tmp_path / 'empty'}: not a model folder (no model.json); run `align` first" in logs


@pytest.mark.parametrize(
    "stage, missing, first",
    [
        ("align", ["--input", "{empty}"], "features"),
        ("teacher", ["--set", "aligned={empty}"], "align"),
        ("label", ["--input", "{images}", "--set", "model={empty}"], "teacher"),
        ("distill", ["--set", "pseudo_labels={empty}"], "label"),
        ("distill", ["--set", "pseudo_labels={labels}", "--set", "features={empty}/features"], "features"),
    ],
)
def test_stage_entry_with_missing_inputs_names_the_stage_to_run_first(
    stage: str, missing: list[str], first: str, tmp_path: Path, demo_data: Path, capsys
) -> None:
    """What each ``jobs/<stage>.py`` runs (``cli.main``), before Ray starts: exit 2, one line naming the stage."""
    (tmp_path / "empty").mkdir()
    labels = tmp_path / "labels"  # a pseudo-label table needs only its _meta.json to pass the existence check
    labels.mkdir()
    (labels / "_meta.json").write_text("{}")
    paths = {"empty": tmp_path / "empty", "images": demo_data / "images", "labels": labels}
    argv = [stage, str(REPO / "jobs/configs/demo" / f"{stage}.yaml"), "--output", str(tmp_path / "out")]
    if stage in ("teacher", "distill"):
        argv += [
            "--input",
            str(demo_data / "AVA.txt"),
            "--set",
            f"labels.images_root={demo_data / 'images'}",
            "--set",
            f"labels.test_list={demo_data / 'test.jpgl'}",
            "--set",
            "aligned=null",
        ]
    argv += [arg.format(**paths) for arg in missing]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"run `{first}` first" in err[0], err
