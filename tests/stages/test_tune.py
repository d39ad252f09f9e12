"""Tune sweeps: search-space checks, a distill sweep end to end (table, best config that runs), ASHA, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO
from ray_head import RayHead

from cskd_ray.app import cli
from cskd_ray.config import ConfigError
from cskd_ray.io.feature_cache import LABEL_SCHEMA, FeatureCache, ResultTable
from cskd_ray.stages import check_stage, load_config
from cskd_ray.stages.tune import plan_tune
from cskd_ray.stages.tune import run as run_tune

os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
CONFIGS = REPO / "jobs" / "configs" / "demo"


@pytest.fixture(scope="module")
def pseudo_labels(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pseudo-label table of 16 unlabeled demo images, written directly (the label stage has its own tests)."""
    out = tmp_path_factory.mktemp("pseudo")
    uris = sorted(str(p) for p in (demo_data / "images").glob("1*.jpg"))
    labeled = {line.split()[1] for line in (demo_data / "AVA.txt").read_text().splitlines()}
    uris = [u for u in uris if Path(u).stem not in labeled][:16]
    dist = np.random.default_rng(0).dirichlet(np.ones(10), size=len(uris)).astype(np.float32)
    table = ResultTable(str(out), LABEL_SCHEMA)
    table.ensure_meta({"model": "test-teacher", "weights": "random", "model_key": "test-teacher"})
    table.write_shard(pa.table({"uri": uris, "sha256": [None] * len(uris), "score": (dist * np.arange(1, 11)).sum(1),
                                "distribution": list(dist), "model": ["test-teacher"] * len(uris),
                                "error": [None] * len(uris)}, schema=LABEL_SCHEMA))
    return out


@pytest.fixture(scope="module")
def feature_cache(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature cache whose 32-d targets share one direction (+ noise), so alignment raises cosine fast."""
    out = tmp_path_factory.mktemp("features")
    uris = sorted(str(p) for p in (demo_data / "images").glob("1*.jpg"))[:24]
    rng = np.random.default_rng(0)
    features = rng.normal(size=32) + 0.3 * rng.normal(size=(len(uris), 32))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    cache = FeatureCache(str(out))
    cache.ensure_meta({"model": "test-clip", "weights": "random", "model_key": "test-clip", "dim": 32})
    cache.write_shard(pa.table({"uri": uris, "sha256": [f"{i:064x}" for i in range(len(uris))],
                                "feature": [f.astype(np.float16) for f in features], "error": [None] * len(uris)},
                               schema=cache.schema))
    return out


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _distill_sweep(tmp: Path, demo: Path, pseudo: Path, sets: tuple[str, ...] = (), **extra: object) -> Path:
    return _write(tmp / "tune.yaml", {
        "stage": "distill", "config": str(CONFIGS / "distill.yaml"), "input": str(demo / "AVA.txt"),
        "output": str(tmp / "sweep"),
        "set": [f"labels.images_root={demo / 'images'}", f"labels.test_list={demo / 'test.jpgl'}", "aligned=null",
                "labels.val_split=test", "labels.val_fraction=0",  # 15 labeled images: the test rows validate
                f"pseudo_labels={pseudo}", "feat_weight=0", "train.batch_size=8", "train.epochs=1",
                "train.warmup_steps=1", "decode_batch_size=8", *sets],
        "search": {"encoder.name": {"grid": ["test_vit", "test_efficientnet"]}, "kd_weight": {"uniform": [0.5, 2.0]}},
        "scheduler": {"kind": "fifo"}, "num_samples": 1, **extra})


def test_search_keys_and_values_are_checked_before_ray(demo_data: Path, pseudo_labels: Path, tmp_path: Path) -> None:
    path = _distill_sweep(tmp_path, demo_data, pseudo_labels)
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr' for the distill stage \(did you mean "
                                          r"'train\.lr'\?\); valid keys: .*train\.weight_decay.*kd_weight"):
        plan_tune(load_config("tune", path, ["search.train.lrr.choice=[0.1]"]))
    with pytest.raises(ConfigError, match=r"unknown key 'output'"):
        plan_tune(load_config("tune", path, ["search.output.choice=[a, b]"]))
    with pytest.raises(ConfigError, match=r"search: kd_weight: Input should be greater than or equal to 0"):
        plan_tune(load_config("tune", path, ["search.kd_weight={grid: [1.0, -1.0]}"]))
    with pytest.raises(ConfigError, match=r"search.encoder.name: unknown timm encoder model 'test_vitt'"):
        plan_tune(load_config("tune", path, ["search.encoder.name.grid=[test_vitt]"]))
    with pytest.raises(ConfigError, match=r"encoder.name has no effect while `aligned` is set"):
        plan_tune(load_config("tune", path, [f"set=[aligned={tmp_path}, pseudo_labels={pseudo_labels}]"]))
    with pytest.raises(ConfigError, match=r"search.train.lr: .*exactly one of choice, grid, uniform"):
        load_config("tune", path, ["search.train.lr={choice: [0.1], uniform: [0.1, 0.2]}"])
    with pytest.raises(ConfigError, match=r"loguniform: low must be > 0"):
        load_config("tune", path, ["search.train.lr.loguniform=[0, 0.1]"])
    plan = plan_tune(load_config("tune", path, ["search.train={lr: {loguniform: [1.0e-4, 1.0e-2]}}"]))
    assert set(plan.cfg.search) == {"encoder.name", "kd_weight", "train.lr"} and plan.metric == "val_srcc"
    assert cli.main(["tune", str(path), "--set", "search.kd_weightt.grid=[1]"]) == 2


def _saved_trials(sweep: Path) -> int:
    """Trials in Tune's latest saved experiment state (what a restore brings back)."""
    states = sorted((sweep / "tune").glob("experiment_state-*.json"))
    try:
        return len(json.loads(states[-1].read_text())["trial_data"]) if states else 0
    except (ValueError, KeyError):  # being written
        return 0


def _registered(sweep: Path) -> list[str]:
    """Trials whose Train run has registered a checkpoint (what a resumed run continues from)."""
    return sorted(p.parents[1].name for p in sweep.glob("trials/*/train/checkpoint_manager_snapshot.json"))


def _history_steps(trial: Path) -> tuple[list[int], list[int]]:
    """The steps of a trial's training history and the steps it restarted from."""
    from cskd_ray.train.history import read_history

    records = read_history((trial / "metrics.jsonl").read_text())
    return [r["step"] for r in records], [r["resumed_from"] for r in records if "resumed_from" in r]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)  # ~90 s on an idle 2-core machine: a killed sweep, its resume, a no-op resume
def test_distill_sweep_killed_mid_trial_resumes_each_trial_once_and_writes_a_best_config_that_checks(
        ray_session, ray_head: RayHead, demo_data: Path, pseudo_labels: Path, tmp_path: Path) -> None:
    """The sweep's driver (``cskd-ray tune`` joined to a running cluster, as a user's job) is SIGKILLed once a trial
    has a registered Train checkpoint and Tune has saved both trials, before any trial ends; ``--resume`` (here
    ``run_tune(resume=True)`` on the session's Ray) finishes the same 2 trials, each once: each trial's history has
    its steps once, and a trial that had a checkpoint continued from it instead of starting over."""
    path = _distill_sweep(tmp_path, demo_data, pseudo_labels, sets=("train.checkpoint_every=1",))
    cfg = load_config("tune", path)
    sweep, log = tmp_path / "sweep", tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "cskd_ray.app.cli", "tune", str(path)],
                                  env=ray_head.driver_env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while not (_saved_trials(sweep) == 2 and _registered(sweep)):
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver; Ray then ends its job's trial actors and Train runs
    driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL and not (sweep / "trials.parquet").exists(), "killed mid-sweep"
    trials = sorted(p.name for p in (sweep / "trials").iterdir())
    checkpointed = set(_registered(sweep))
    unfinished = {t for t in trials if not (sweep / "trials" / t / "model").exists()}
    assert len(trials) == 2 and checkpointed & unfinished, (trials, checkpointed, unfinished)

    result = run_tune(cfg, resume=True)
    assert result.resumed
    table = pq.read_table(sweep / "trials.parquet").to_pylist()
    assert sorted(row["trial_id"] for row in table) == trials == sorted(p.name for p in (sweep / "trials").iterdir())
    for row in (row for row in table if row["trial_id"] in unfinished):
        trial = row["trial_id"]
        steps, restarts = _history_steps(sweep / "trials" / trial)
        assert steps == list(range(1, row["steps"] + 1)) and row["steps"] >= 2, f"{trial}: each step once: {steps}"
        assert len(restarts) == (trial in checkpointed), f"{trial}: resumed from its checkpoint: {restarts}"
    # one trial per grid value of the architecture, each with its own sampled loss weight
    assert len(table) == 2 and all(row["status"] == "finished" and row["error"] is None for row in table)
    assert sorted(row["encoder.name"] for row in table) == ["test_efficientnet", "test_vit"]
    assert all(0.5 <= row["kd_weight"] <= 2.0 for row in table) and table[0]["kd_weight"] != table[1]["kd_weight"]
    assert all(-1.0 <= row["val_srcc"] <= 1.0 and row["epochs"] == 1 and not row["stopped_early"] for row in table)
    assert [row["val_srcc"] for row in table] == sorted((row["val_srcc"] for row in table), reverse=True)
    with open(sweep / "trials.csv") as f:
        assert [row["trial_id"] for row in csv.DictReader(f)] == [row["trial_id"] for row in table]
    for row in table:  # each trial ran the real stage into its own folder
        assert (Path(row["output"]) / "model" / "model.json").exists()
    best = load_config("distill", sweep / "best_config.yaml")
    assert best.encoder.name == table[0]["encoder.name"] and best.kd_weight == table[0]["kd_weight"]
    assert best.output == str(sweep / "best") and result.best["trial_id"] == table[0]["trial_id"]
    check_stage("distill", best)  # what `cskd-ray distill best_config.yaml` checks before training (inputs exist)

    # the sweep is complete: a rerun needs --resume, and resuming reruns no trial
    with pytest.raises(ConfigError, match=r"already holds a sweep; pass --resume"):
        run_tune(cfg)
    checkpoints = sorted(p for p in (sweep / "trials").rglob("checkpoint_*"))
    stamps = [(sweep / "trials" / row["trial_id"] / "model" / "model.safetensors").stat().st_mtime_ns
              for row in table]
    resumed = run_tune(cfg, resume=True)
    assert resumed.resumed and [r["trial_id"] for r in resumed.rows] == [r["trial_id"] for r in table]
    assert all(r["status"] == "finished" for r in resumed.rows)
    assert sorted(p for p in (sweep / "trials").rglob("checkpoint_*")) == checkpoints
    assert stamps == [(sweep / "trials" / row["trial_id"] / "model" / "model.safetensors").stat().st_mtime_ns
                      for row in table]
    changed = load_config("tune", tmp_path / "tune.yaml", ["search.kd_weight={grid: [1.0]}"])
    with pytest.raises(ConfigError, match=r"--resume: search differ from the sweep in"):
        run_tune(changed, resume=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)  # ~50 s on an idle 2-core machine
def test_asha_stops_a_trial_whose_lr_cannot_learn(ray_session, feature_cache: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "tune.yaml", {
        "stage": "align", "config": str(CONFIGS / "align.yaml"), "input": str(feature_cache),
        "output": str(tmp_path / "sweep"),
        "set": ["train.batch_size=8", "train.epochs=2", "train.max_steps=5", "train.warmup_steps=0",
                "train.checkpoint_every=1", "decode_batch_size=8"],
        # the first trial learns; the second (lr 1e-9) cannot, and trails it at the rung after 3 reports
        "search": {"train.lr": {"grid": [1.0e-2, 1.0e-9]}},
        "scheduler": {"kind": "asha", "grace_period": 3, "reduction_factor": 2},
        "num_samples": 1, "max_concurrent": 1})
    result = run_tune(load_config("tune", path))
    assert result.metric == "cosine"
    rows = {row["train.lr"]: row for row in result.rows}
    assert rows[1.0e-2]["status"] == "finished" and rows[1.0e-2]["reports"] == 5
    assert rows[1.0e-9]["stopped_early"] and rows[1.0e-9]["reports"] == 3
    assert rows[1.0e-2]["cosine"] > rows[1.0e-9]["cosine"]
    assert yaml.safe_load((tmp_path / "sweep" / "best_config.yaml").read_text())["train"]["lr"] == 1.0e-2
    # Ray leaves the stopped trial's Train placement group reserved until the sweep's driver exits (Ray's own
    # cleaner needs the dashboard's state API, Ray issue 54305): the sweep's ReleaseStoppedTrials callback frees it
    from ray.util import placement_group_table

    held = {pg_id: pg["bundles"] for pg_id, pg in placement_group_table().items() if pg["state"] == "CREATED"}
    assert not held, f"placement groups still reserved after the sweep: {held}"
