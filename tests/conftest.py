"""Session fixtures: a local Ray (num_cpus=2, loopback), a moto S3 server on a free loopback port, demo data."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: weights loading must fail fast
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Ray Train V2's controller polls its workers every 2 s by default, so each of the suite's ~20 trainer runs waited
# up to 2 s at start and at the end for nothing; the preemption watcher (one more actor process per run) only
# matters on cloud spot nodes. Both are plain Ray settings, read when a TorchTrainer starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
# Every Ray of the session (ray_session, ray_head, the multi-node Cluster) on 127.0.0.1, not on the machine's network
# address that Ray substitutes for 127.0.0.1 otherwise (cskd_ray.app.runtime.LOCAL_RAY_ENV says more).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs" / "demo"
SHARED_LABELS = Path(os.environ.get("CSKD_SHARED_LABELS", REPO.parent / "shared" / "data" / "labels"))


def _unmask_timeout(item: pytest.Item):
    """Report a timeout that Ray turned into a ``SystemError`` as the timeout it is.

    When pytest-timeout's SIGALRM lands while the main thread waits in ``ray.get``, Ray's signal check leaves the
    ``Failed`` exception pending, and the next C call raises ``SystemError: <built-in method __new__ of type
    object> returned a result with an exception set`` with the timeout only as its cause (seen in
    test_tune's sweep, reproduced in isolation): a timed-out test looked like a Ray deserialisation bug.
    """
    try:
        return (yield)
    except SystemError as exc:
        if exc.__cause__ is None or "Timeout" not in str(exc.__cause__):
            raise
        raise exc.__cause__ from None


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_unmask_timeout)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_unmask_timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray for the whole session: 2 logical CPUs, bound to 127.0.0.1, dashboard on 127.0.0.1.

    It starts after the S3 server so that its workers inherit the endpoint and test credentials. It declares
    the Tune trial-driver resource and runs the dashboard (on loopback) as ``init_ray`` does (ASHA-stopped
    trials' placement groups are freed by ``cskd_ray.stages.tune_release`` without it; Ray's state API needs it); it
    costs no measurable start-up time here. Its workers run ``tests/fault_injection.py``'s setup hook, which lets a
    test have one worker kill itself at a chosen write.
    """
    import ray
    from fault_injection import FAULTS_DIR_ENV

    from cskd_ray.train.placement import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS

    os.environ[FAULTS_DIR_ENV] = str(tmp_path_factory.mktemp("faults"))
    tests = str(Path(__file__).resolve().parent)
    python_path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1", resources={TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path},
                          "worker_process_setup_hook": "fault_injection.install"})
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_head() -> Iterator:
    """A ``ray start --head`` of our own (tests/ray_head.py), started once for the tests that submit Ray Jobs or run
    drivers against a real cluster head, and stopped by its own pids at the end."""
    from ray_head import running_head

    with running_head() as head:
        yield head


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto in server mode) on a free loopback port; env points boto/pyarrow at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    from cskd_ray.io import storage

    storage._s3_filesystem.cache_clear()
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage._s3_filesystem.cache_clear()


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test; returns ``s3://<bucket>``."""
    import boto3

    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid() % 1000}"
    name = "".join(c for c in name if c.isalnum() or c == "-")
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_dir(local: Path, s3_uri: str) -> None:
    """Copy a local folder's files to an S3 prefix (keys keep relative paths)."""
    from cskd_ray.io import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_once(storage.join(s3_uri, str(path.relative_to(local))), path.read_bytes())


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 demo images at 64 px (25% labeled) plus 4 corrupt files, generated once per session."""
    from cskd_ray.io.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, 60, labeled_fraction=0.25, seed=0, image_size=64, num_corrupt=4)
    return out


@pytest.fixture(scope="session")
def feature_cache(ray_session, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The features stage's cache of the session's demo images (tiny random CLIP), built once for every test that
    trains on it (align, train faults, distill)."""
    from cskd_ray.stages import load_config
    from cskd_ray.stages.features import run as run_features

    out = str(tmp_path_factory.mktemp("features") / "features")
    cfg = load_config("features", CONFIGS / "features.yaml", ["batch_size=32"],
                      input_uris=[str(demo_data / "images")], output_uri=out)
    run_features(cfg)
    return out


@pytest.fixture(scope="session")
def teacher_run(ray_session, demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run, made once: a teacher trained in two runs (the second resumes the first at step 2), its
    pseudo-labels of ``unlabeled.csv`` and its evaluation on the test split.

    Layout: ``teacher/`` (with ``model/``), ``first-history.jsonl`` (the history after the first run),
    ``pseudo-labels/``, ``evaluate-teacher/``. The teacher, report and distill tests read it; none writes into it.
    """
    from cskd_ray.stages import load_config
    from cskd_ray.stages.evaluate import EvaluateConfig
    from cskd_ray.stages.evaluate import run as run_evaluate
    from cskd_ray.stages.label import run as run_label
    from cskd_ray.stages.teacher import run as run_teacher

    run = tmp_path_factory.mktemp("run")
    base = [f"labels.images_root={demo_data / 'images'}", f"labels.test_list={demo_data / 'test.jpgl'}",
            "labels.val_split=test", "labels.val_fraction=0",  # 15 labeled images: the test rows validate
            "aligned=null", "train.batch_size=4", "train.epochs=2", "train.warmup_steps=1", "decode_batch_size=4"]
    labels = [str(demo_data / "AVA.txt")]
    teacher = run / "teacher"
    run_teacher(load_config("teacher", CONFIGS / "teacher.yaml", [*base, "train.max_steps=2"], input_uris=labels,
                            output_uri=str(teacher)))
    (run / "first-history.jsonl").write_text((teacher / "metrics.jsonl").read_text())
    result = run_teacher(load_config("teacher", CONFIGS / "teacher.yaml", base, input_uris=labels,
                                     output_uri=str(teacher)))  # resumes from step 2
    (run / "teacher-result.json").write_text(json.dumps({"head": result.head, "train_rows": result.train_rows,
                                                         "val_rows": result.val_rows, "steps": result.steps}))
    run_label(load_config("label", CONFIGS / "label.yaml", [f"model={teacher / 'model'}", "decode_batch_size=8"],
                          input_uris=[str(demo_data / "unlabeled.csv")], output_uri=str(run / "pseudo-labels")),
              progress=lambda line: None)
    run_evaluate(EvaluateConfig(str(teacher / "model"), "ava", str(demo_data / "AVA.txt"),
                                str(run / "evaluate-teacher"), str(demo_data / "images"),
                                str(demo_data / "test.jpgl"), "test"))
    return run
