"""Flaky object storage: features and align checkpointing complete through 20% injected S3 faults.

A :class:`faults.FaultyProxy` sits in front of the moto server and answers 20% of requests with
``503 SlowDown`` or a dropped connection. The stages run through the real CLI in a subprocess whose
``AWS_ENDPOINT_URL`` is the proxy (its own local Ray, so every Ray worker talks to the proxy too). Label and score
read and write through the same code as features (row_pipeline, ResultTable shards), so they are not run again here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import REPO, upload_dir
from faults import FaultyProxy

from cskd_ray.io import storage
from cskd_ray.io.feature_cache import FeatureCache

pytestmark = [pytest.mark.s3, pytest.mark.slow]
CONFIGS = REPO / "jobs" / "configs" / "demo"


def test_retries_are_what_makes_the_difference(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one attempt per call the faults break writes and reads; with the default attempts (and the default
    ``standard`` retry mode) none fails. The one-attempt arm runs in ``legacy`` mode: one attempt is one attempt in
    both modes (pyarrow passes legacy's number as retries; ``storage`` passes attempts - 1)."""
    with FaultyProxy(s3_server, rate=0.2, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        failures = {}
        for attempts in (1, storage.DEFAULT_S3_MAX_ATTEMPTS):
            monkeypatch.setenv("AWS_RETRY_MODE", "legacy" if attempts == 1 else "standard")
            monkeypatch.setenv("CSKD_S3_MAX_ATTEMPTS", str(attempts))  # the SDK's retries of each request
            monkeypatch.setenv("CSKD_S3_OP_ATTEMPTS", str(1 if attempts == 1 else storage.DEFAULT_S3_OP_ATTEMPTS))
            failures[attempts] = 0
            for i in range(15):
                uri = f"{s3_bucket}/retry-{attempts}/{i}.bin"
                try:
                    storage.write_bytes_once(uri, bytes([i]) * (100 + i))
                    assert storage.read_bytes(uri) == bytes([i]) * (100 + i)
                except storage.StorageError:
                    failures[attempts] += 1
        assert proxy.counts["503"] and proxy.counts["drop"], proxy.counts
    assert failures[1] > 0, "the proxy must really break calls"
    assert failures[storage.DEFAULT_S3_MAX_ATTEMPTS] == 0
    monkeypatch.setenv("CSKD_S3_MAX_ATTEMPTS", "zero")
    with pytest.raises(storage.StorageError, match="CSKD_S3_MAX_ATTEMPTS='zero'"):
        storage.s3_filesystem()
    monkeypatch.setenv("CSKD_S3_OP_ATTEMPTS", "-1")
    with pytest.raises(storage.StorageError, match="CSKD_S3_OP_ATTEMPTS='-1'"):
        storage.retry_io(lambda: None, f"{s3_bucket}/x")
    monkeypatch.setenv("CSKD_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")  # boto3's third mode: not in pyarrow, runs as standard
    assert storage.s3_filesystem().spec[2:] == (3, "standard")
    monkeypatch.setenv("AWS_RETRY_MODE", "fast")
    with pytest.raises(storage.StorageError, match=r"AWS_RETRY_MODE='fast': .* \['legacy', 'standard'\]"):
        storage.s3_filesystem()


def test_retry_settings_survive_pickling_to_ray_workers(s3_server: str) -> None:
    import pickle

    for mode in storage.S3_RETRY_MODES:
        fs = storage._s3_filesystem(s3_server, "us-east-1", 7, mode)
        copy = pickle.loads(pickle.dumps(fs))
        assert isinstance(copy, pafs.S3FileSystem) and copy.spec == (s3_server, "us-east-1", 7, mode)


@pytest.mark.ray
@pytest.mark.timeout(900)  # two stages with their own local Ray; about a minute on an idle 2-core box
def test_features_and_align_complete_through_20_percent_faults(
    s3_server: str, s3_bucket: str, demo_data: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (demo_data / "images").iterdir())
    for name in names[:14]:
        (images / name).write_bytes((demo_data / "images" / name).read_bytes())
    upload_dir(images, f"{s3_bucket}/images")
    inputs = sorted(f"{s3_bucket}/images/{p.name}" for p in images.iterdir())
    stages = [
        [
            "features",
            str(CONFIGS / "features.yaml"),
            "--input",
            f"{s3_bucket}/images",
            "--output",
            f"{s3_bucket}/features",
            "--set",
            "batch_size=8",
            "--set",
            "decode_batch_size=4",
            "--set",
            "shard_rows=4",
        ],
        [
            "align",
            str(CONFIGS / "align.yaml"),
            "--input",
            f"{s3_bucket}/features",
            "--output",
            f"{s3_bucket}/align",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.checkpoint_every=1",
            "--set",
            "train.max_failures=3",
            "--set",
            "decode_batch_size=4",
        ],
    ]
    script = "import sys\nfrom cskd_ray.app.cli import main\nfor argv in %r:\n    if main(argv):\n        sys.exit(2)\n"
    with FaultyProxy(s3_server, rate=0.2, modes=("503", "drop"), seed=0) as proxy:
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": proxy.endpoint,
            "CSKD_S3_MAX_ATTEMPTS": "10",
            # the SDK's legacy backoff (25 ms · 2^k, no retry quota): 52 s instead of 71-75 s; the default standard
            # mode's retries are shown by test_retries_are_what_makes_the_difference
            "AWS_RETRY_MODE": "legacy",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
        }
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, "-c", script % (stages,)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=840,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"flaky storage: {dict(proxy.counts)}")
    assert proxy.counts["503"] >= 10 and proxy.counts["drop"] >= 10, proxy.counts
    features = FeatureCache(f"{s3_bucket}/features").read()
    assert sorted(features.column("uri").to_pylist()) == inputs, "features: every input exactly once"
    assert features.column("error").null_count > 0, "features: computed through the faults"
    checkpoints = [
        i.path
        for i in storage.s3_filesystem().get_file_info(
            pafs.FileSelector(f"{s3_bucket[5:]}/align/train", recursive=False)
        )
        if i.type == pafs.FileType.Directory and i.path.rsplit("/", 1)[-1].startswith("checkpoint_")
    ]
    assert checkpoints, "align checkpointed to s3://"
    for checkpoint in checkpoints:
        assert storage.exists(f"s3://{checkpoint}/manifest.json")
    assert storage.exists(f"{s3_bucket}/align/model/model.safetensors")
