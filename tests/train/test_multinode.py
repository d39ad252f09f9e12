"""Multi-node correctness on one machine: a head plus two worker nodes (``ray.cluster_utils.Cluster``, 127.0.0.1,
each node with its own CPUs and object store).

Checked: the features pass runs its actors on more than one node; a 2-worker Ray Train run (align,
``train.placement_strategy=STRICT_SPREAD``) puts its workers on two different nodes; the features table holds
exactly one row per input (no duplicates, corrupt images as error rows) and the trained model is written. Label and
score run the same pass (``io/row_pipeline``) with another model actor, so they are not run again here.

One process holds one Ray, and the test session's ``ray_session`` may already be up, so the cluster runs in a
child process (this file run as a script); the test reads what it reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from ray_processes import own_ray_env, patient_node_startup, stop_processes_under

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"  # the helpers this file imports when it runs as a script (ray_processes)
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    """A free loopback port outside Ray's worker port range (10002-19999)."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _actor_nodes(address: str, class_name: str) -> list[str]:
    """Node ids of every actor (alive or finished) of ``class_name`` in the cluster at ``address`` (given: with
    other Rays on the machine, the state API cannot pick one by itself)."""
    from ray.util.state import list_actors

    return [  # an actor Ray Data created but never placed (no node) does not count
        actor.node_id
        for actor in list_actors(
            address=address,
            filters=[("class_name", "=", class_name)],
            limit=10_000,
            timeout=120,
            detail=True,
            raise_on_missing_output=False,
        )
        if actor.node_id
    ]


def _node_args() -> dict:
    """One node: 1 CPU, its own object store and agent port (the default port may be held by another Ray here).

    No ``node_ip_address``: a driver's ``ray.init`` turns 127.0.0.1 into the machine's own address (Ray 2.60,
    ``resolve_ip_for_localhost``) and then never finds nodes registered as 127.0.0.1; ``ray start`` does the
    same. The traffic stays on this machine either way.
    """
    return {
        "num_cpus": 1,
        "object_store_memory": 100 << 20,
        "dashboard_agent_listen_port": _free_port(),
    }


def _start_cluster() -> tuple[Any, list, Path]:
    """A head plus two worker nodes under a temp dir of their own. Ray gives a raylet 30 s to register with the
    GCS, which a heavily loaded machine can miss: then that attempt's processes are stopped and it starts again."""
    from ray.cluster_utils import Cluster

    from cskd_ray.train.placement import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS

    for attempt in range(3):
        temp_dir = Path(tempfile.mkdtemp(prefix="cskdm", dir="/tmp"))  # short: Ray's socket paths must fit
        try:
            head = {
                **_node_args(),
                "temp_dir": str(temp_dir),
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": _free_port(),
                "resources": {TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
            }
            cluster = Cluster(initialize_head=True, head_node_args=head)
            return cluster, [cluster.add_node(**_node_args()) for _ in range(2)], temp_dir
        except Exception as exc:
            stop_processes_under(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def run_cluster(work: Path) -> dict:
    """Start the 3-node cluster, run features and a 2-worker align on it, and report what ran where."""
    import ray

    from cskd_ray.io.demo import make_demo_data
    from cskd_ray.io.feature_cache import FeatureCache
    from cskd_ray.stages import load_config
    from cskd_ray.stages.align import run as run_align
    from cskd_ray.stages.features import run as run_features

    data = work / "data"
    make_demo_data(data, 40, labeled_fraction=0.25, seed=0, image_size=64, num_corrupt=2)
    started = time.perf_counter()
    patient_node_startup()  # a loaded machine can take longer than Ray's fixed 30 s to register a node
    cluster, workers, temp_dir = _start_cluster()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        from ray.data import DataContext

        # A pool of 2 starts work as soon as one actor is ready; on 40 images the other may never be placed.
        # Wait for both (each on its own node), as a cluster of many nodes would have them.
        DataContext.get_current().wait_for_min_actors_s = 600
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        report: dict = {
            "nodes": nodes,
            "worker_nodes": sorted(w.node_id for w in workers),
            "cluster_seconds": round(time.perf_counter() - started, 1),
        }
        # 0.75 CPU per actor on 1-CPU nodes: at most one actor per node, so two actors are on two nodes
        pool = [
            "concurrency=2",
            "num_cpus_per_actor=0.75",
            "decode_num_cpus=0.25",
            "batch_size=8",
            "decode_batch_size=4",
            "shard_rows=8",
        ]
        images = str(data / "images")
        features = load_config(
            "features",
            REPO / "jobs/configs/demo/features.yaml",
            pool,
            input_uris=[images],
            output_uri=str(work / "features"),
        )
        run_features(features)
        report["features_nodes"] = _actor_nodes(cluster.address, "MapWorker(MapBatches(ClipFeatureActor))")
        table = FeatureCache(features.output).read(["uri", "error"]).to_pydict()
        report["features_uris"], report["features_errors"] = table["uri"], sum(bool(e) for e in table["error"])

        align = load_config(
            "align",
            REPO / "jobs/configs/demo/align.yaml",
            [
                "train.num_workers=2",
                "train.placement_strategy=STRICT_SPREAD",
                "train.cpus_per_worker=0.5",
                "train.batch_size=8",
                "train.max_steps=2",
                "decode_batch_size=4",
            ],
            input_uris=[features.output],
            output_uri=str(work / "align"),
        )
        result = run_align(align)
        report["align_steps"] = result.steps
        report["train_nodes"] = _actor_nodes(cluster.address, "RayTrainWorker")
        report["images"] = sorted(str(p) for p in (data / "images").iterdir())
        report["seconds"] = round(time.perf_counter() - started, 1)
        return report
    finally:
        ray.shutdown()
        cluster.shutdown()
        stop_processes_under(temp_dir)  # anything the shutdown left behind, and only this cluster's processes
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(900)  # ~2 min on an idle 2-core machine; far longer when other jobs load it
def test_features_and_train_spread_over_nodes_with_complete_outputs(tmp_path: Path) -> None:
    env = own_ray_env(tmp_path, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"multinode: cluster up in {report['cluster_seconds']} s, all done in {report['seconds']} s")
    nodes = set(report["nodes"])
    assert len(nodes) == 3 and set(report["worker_nodes"]) < nodes
    for key in ("features_nodes", "train_nodes"):
        assert set(report[key]) <= nodes, key
        assert len(set(report[key])) >= 2, f"{key}: every actor on one node: {report[key]}"
    assert len(report["train_nodes"]) == 2 and report["align_steps"] == 2
    assert (tmp_path / "align" / "model" / "model.json").is_file()
    images = report["images"]
    assert sorted(report["features_uris"]) == images  # one row per input, duplicate-free, errors as rows
    assert 0 < report["features_errors"] < len(images)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    (out / "report.json").write_text(json.dumps(run_cluster(out)))
