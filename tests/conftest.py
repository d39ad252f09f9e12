"""Session fixtures: a local Ray (num_cpus=2, loopback), a moto S3 server on a free loopback port, demo data."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: weights loading must fail fast
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_LABELS = Path(os.environ.get("CSKD_SHARED_LABELS", REPO.parent / "shared" / "data" / "labels"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """One local Ray for the whole session: 2 logical CPUs, bound to 127.0.0.1, dashboard on 127.0.0.1.

    It starts after the S3 server so that its workers inherit the endpoint and test credentials. It declares
    the Tune trial-driver resource as ``init_ray`` does, and runs the dashboard (on loopback) because Ray
    only frees the placement group of a trial that ASHA stopped through it (Ray issue 54305); it costs no
    measurable start-up time here.
    """
    import ray

    from cskd_ray.runtime import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1", resources={TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
             log_to_driver=False, configure_logging=False)
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


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
    from cskd_ray import storage

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
    from cskd_ray import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_once(storage.join(s3_uri, str(path.relative_to(local))), path.read_bytes())


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 demo images at 64 px (25% labeled) plus 4 corrupt files, generated once per session."""
    from cskd_ray.data.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, 60, labeled_fraction=0.25, seed=0, image_size=64, num_corrupt=4)
    return out
