"""Deployment files, checked offline: cluster.yaml by Ray's own launcher validation, the KubeRay RayJob by Ray's
own KubeRay autoscaler reader plus its required structure, and the AVA pipeline config by our config loader."""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from cskd_ray.app.pipeline import load_pipeline_config
from cskd_ray.stages import STAGE_CONFIGS, load_config

REPO = Path(__file__).resolve().parents[1]
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / name).read_text())


def _launcher_config(raw: dict[str, Any]) -> dict[str, Any]:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_launcher_validation() -> None:
    config = _launcher_config(_load("cluster.yaml"))
    assert config["provider"]["type"] == "aws" and config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0  # the head schedules no work
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    gpu = [spec for spec in workers.values() if spec["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [spec for spec in workers.values() if spec["node_config"]["InstanceType"].startswith(("c", "m"))]
    assert len(gpu) == 1 and len(cpu) == 1
    for spec in workers.values():  # autoscaled, from zero
        assert spec["min_workers"] == 0 < spec["max_workers"]
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]
    # S3 through an instance profile on every node, never keys in the file
    assert all("IamInstanceProfile" in spec["node_config"] for spec in types.values())
    assert "AWS_SECRET_ACCESS_KEY" not in (REPO / "cluster.yaml").read_text()
    # the project, installed with the pinned constraints
    assert any("pip install" in cmd and "-c constraints.txt -e ." in cmd for cmd in config["setup_commands"])
    assert "." in config["file_mounts"].values()
    # dashboard only on the head's loopback (reached through `ray dashboard cluster.yaml`), token auth on
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize(
    "path, typo",
    [
        (("available_node_types", "gpu_worker"), ("max_worker", 4)),
        (("available_node_types", "cpu_worker"), ("min_wokers", 0)),
        ((), ("setup_command", ["true"])),
        (("docker",), ("imagee", IMAGE)),
    ],
)
def test_cluster_yaml_with_a_typo_is_rejected(path: tuple[str, ...], typo: tuple[str, Any]) -> None:
    raw = _load("cluster.yaml")
    node = raw
    for key in path:
        node = node[key]
    node[typo[0]] = typo[1]
    with pytest.raises(jsonschema.ValidationError, match=typo[0]):
        _launcher_config(raw)


def test_rayjob_cluster_spec_is_read_by_rays_kuberay_autoscaler() -> None:
    """Not validated against the RayJob CRD schema (none is available offline): Ray's own KubeRay reader turns
    ``rayClusterSpec`` into an autoscaler config and validates that; the RayJob fields are checked here."""
    job = _load("deploy/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", "jobs/pipeline.py", "jobs/configs/ava/pipeline.yaml"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules", "config"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())  # Ray rejects non-string env values
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    autoscaling = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": job["metadata"]["name"], "namespace": job["metadata"]["namespace"]}, "spec": cluster}
    )
    types = autoscaling["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"]
    images = {
        c["image"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for c in group["template"]["spec"]["containers"]
    }
    assert len(images) == 1  # one image everywhere: deploy/Dockerfile
    assert f"FROM {IMAGE}" in (REPO / "deploy" / "Dockerfile").read_text()


def test_ava_pipeline_config_and_its_stage_configs_load() -> None:
    cfg = load_pipeline_config(REPO / "jobs/configs/ava/pipeline.yaml")
    assert cfg.output.startswith("s3://") and cfg.demo_data is None
    for name, stage in cfg.stages.items():
        kind = "align" if name.startswith("align") else name
        assert kind in STAGE_CONFIGS
        extra = ["model=s3://b/m"] if kind == "score" else []
        inputs = ["s3://b/in"] if stage.config is None else None
        load_config(
            kind,
            REPO / stage.config if stage.config else None,
            [*stage.set, *extra],
            input_uris=inputs,
            output_uri="s3://b/out" if stage.config is None else None,
        )


def test_ray_get_auth_token_generate_writes_the_token_cluster_yaml_copies(tmp_path: Path) -> None:
    """docs/cluster.md step 3, with a temporary HOME (the user's own ~/.ray/auth_token is never touched)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    ray = str(Path(sys.executable).parent / "ray")
    done = subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    token = (tmp_path / ".ray" / "auth_token").read_text()
    assert done.stdout == token and len(token) == 64
    mounts = _load("cluster.yaml")["file_mounts"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.s3
@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI is not installed")
def test_aws_s3_upload_commands_of_the_docs(s3_bucket: str, demo_data: Path, tmp_path: Path) -> None:
    """docs/cluster.md step 2 against the moto S3 server: sync uploads everything once, a rerun adds nothing."""
    from cskd_ray.io import storage

    env = dict(os.environ)  # AWS_ENDPOINT_URL and test credentials from the s3_server fixture
    images = f"{s3_bucket}/ava/images/"
    commands = [
        ["aws", "s3", "sync", str(demo_data / "images"), images, "--only-show-errors"],
        ["aws", "s3", "cp", str(demo_data / "AVA.txt"), f"{s3_bucket}/ava/AVA.txt"],
        ["aws", "s3", "cp", str(demo_data / "test.jpgl"), f"{s3_bucket}/ava/test.jpgl"],
    ]
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    local = sorted(p.name for p in (demo_data / "images").iterdir())
    assert sorted(entry.uri.rsplit("/", 1)[1] for entry in storage.list_files(images)) == local
    assert storage.read_bytes(f"{s3_bucket}/ava/AVA.txt") == (demo_data / "AVA.txt").read_bytes()
    rerun = subprocess.run([*commands[0][:-1], "--dryrun"], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and rerun.stdout.strip() == ""  # nothing left to upload
