"""Every training stage under DDP with 2 workers trains as 1 worker on the same global batches.

The real task objects (align, teacher, distill with the feature term, the consistency term and two extra
teachers) and the real optimizer step (``cskd_ray.train.step``) run in 2 processes under ``torch.distributed``
(gloo), each task wrapped in ``DistributedDataParallel`` as ``ray.train.torch.prepare_model`` wraps it, and in
1 process without DDP. Rank r gets rows ``[4r, 4r + 4)`` of each 8-row global batch; the batches are built so
that one rank has no feature row, no labeled row, no unlabeled row or an invalid row at some step. Ray Train's own
wiring of the same loop with 2 workers is covered by tests/stages/test_align.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from test_distill import EXTRA_TEACHERS, HEAD, _save_teacher

from cskd_ray.stages import load_config
from cskd_ray.train.config import TrainerConfig
from cskd_ray.train.launch import TaskFactory
from cskd_ray.train.step import global_metrics, make_optimizer, train_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CONFIGS = REPO / "jobs" / "configs" / "demo"
SIZE, ROWS, STEPS = 64, 8, 3  # image size, global batch, optimizer steps
# per step and row: valid, labeled, has a cached CLIP feature. Rank 0 holds rows 0-3, rank 1 rows 4-7.
LAYOUT = [
    {"valid": [1, 1, 1, 1, 1, 1, 1, 1], "labeled": [1, 1, 0, 0, 1, 0, 0, 0], "feature": [0, 0, 1, 0, 0, 1, 1, 0]},
    # rank 0: no feature row (its projection must still get a gradient); rank 1: no labeled row
    {"valid": [1, 1, 1, 1, 1, 1, 1, 0], "labeled": [1, 0, 0, 0, 0, 0, 0, 0], "feature": [0, 0, 0, 0, 1, 1, 0, 1]},
    # rank 1: only labeled rows (no kd, feature or consistency row); rank 0: an invalid row
    {"valid": [1, 0, 1, 1, 1, 1, 1, 1], "labeled": [0, 0, 1, 0, 1, 1, 1, 1], "feature": [1, 1, 0, 1, 0, 0, 0, 0]},
]


def _batch(stage: str, step: int) -> dict[str, torch.Tensor]:
    """Global batch ``step`` of ``stage`` (the same in every process)."""
    rng = np.random.default_rng(100 + step)
    layout = {k: torch.tensor(v, dtype=torch.uint8) for k, v in LAYOUT[step].items()}
    batch = {"pixels": torch.from_numpy(rng.integers(0, 255, (ROWS, SIZE, SIZE, 3), dtype=np.uint8)),
             "valid": layout["valid"]}
    if stage == "align":
        return {**batch, "target": torch.from_numpy(rng.normal(size=(ROWS, 32)).astype(np.float32))}
    dist = rng.dirichlet(np.ones(10), size=ROWS).astype(np.float32)
    batch.update(score=torch.from_numpy((dist * np.arange(1, 11)).sum(1)), distribution=torch.from_numpy(dist))
    if stage == "distill":
        batch.update(labeled=layout["labeled"], has_feature=layout["feature"],
                     feature=torch.from_numpy(rng.normal(size=(ROWS, 32)).astype(np.float32)),
                     row=torch.arange(step * ROWS, (step + 1) * ROWS))
    return batch


def _train(stages: dict[str, tuple[dict, TaskFactory]], rank: int, world: int) -> dict[str, dict]:
    """Each stage's task trained ``STEPS`` steps on this rank's rows; its final weights and per-step metrics."""
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for name, (stage, factory) in stages.items():
        cfg = TrainerConfig(**stage["train"])
        torch.manual_seed(cfg.seed)  # as run_worker_loop, before building the task
        task = factory(stage)
        initial = {k: v.detach().clone() for k, v in task.state_dict().items()}
        model = DistributedDataParallel(task) if world > 1 else task
        params = [p for p in task.trainable_parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, cfg, STEPS)
        scaler = torch.amp.GradScaler(enabled=False)
        metrics = []
        for step in range(STEPS):
            if hasattr(task, "set_epoch"):
                task.set_epoch(0)  # as the loop does at each epoch start
            per_rank = ROWS // world
            rows = slice(rank * per_rank, (rank + 1) * per_rank)
            local = {k: v[rows] for k, v in _batch(name, step).items()}
            metrics.append(global_metrics(train_step(model, local, optimizer, scheduler, scaler, params, cfg, step,
                                                     rank)))
        results[name] = {"weights": {k: v.detach().clone() for k, v in task.state_dict().items()},
                         "initial": initial, "metrics": metrics}
    return results


def _rank_main(rank: int, world: int, init_file: str, stages: dict, out: str) -> None:
    """One DDP worker process (torch.multiprocessing.spawn)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = _train(stages, rank, world)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _stages(demo: Path, tmp: Path) -> dict[str, tuple[dict, TaskFactory]]:
    common = ["train.lr=0.003", "train.warmup_steps=1", "train.batch_size=8", "train.num_workers=2"]
    align = load_config("align", CONFIGS / "align.yaml", common, input_uris=[str(tmp)], output_uri=str(tmp / "a"))
    labels = [f"labels.images_root={demo / 'images'}", f"labels.test_list={demo / 'test.jpgl'}", "aligned=null",
              "labels.val_split=test", "labels.val_fraction=0"]  # 15 labeled images: the test rows validate
    teacher = load_config("teacher", CONFIGS / "teacher.yaml", [*common, *labels],
                          input_uris=[str(demo / "AVA.txt")], output_uri=str(tmp / "t"))
    model = _save_teacher(tmp / "teacher-model", "test_vit2")
    distill = load_config("distill", CONFIGS / "distill.yaml",
                          [*common, *labels, "kd_weight=0.7", "feat_weight=0.5", "consistency_weight=0.8",
                           f"teacher_model={model}", f"pseudo_labels={tmp}", f"features={tmp}", EXTRA_TEACHERS],
                          input_uris=[str(demo / "AVA.txt")], output_uri=str(tmp / "d"))
    return {"align": (align.model_dump(), TaskFactory("cskd_ray.train.align", "AlignTask", {"clip_dim": 32})),
            "teacher": (teacher.model_dump(), TaskFactory("cskd_ray.train.supervise", "SupervisedTask",
                                                          {"head": HEAD})),
            "distill": (distill.model_dump(), TaskFactory("cskd_ray.train.distill", "DistillTask",
                                                          {"head": HEAD, "clip_dim": 32}))}


def test_two_ddp_workers_train_every_stage_as_one_worker(demo_data: Path, tmp_path: Path) -> None:
    """Every per-step metric (the global-batch mean of each loss term) agrees to 1e-4, and the final weights of 2 DDP
    workers equal 1 worker's up to 1% of how far the weights moved (seen: 0.1-0.4%; AdamW's 1/sqrt(v) magnifies
    float-summation differences on near-zero gradients). Without the cross-rank row counts a worker's mean weighs
    its rows by 1/(its rows), and the metrics differ from step 1 (an invalid row); without the always-run
    projections rank 0 has no feature row at step 1 and DDP aborts at the next step."""
    stages = _stages(demo_data, tmp_path)
    out = tmp_path / "two.pt"
    context = torch.multiprocessing.start_processes(
        _rank_main, args=(2, str(tmp_path / "rendezvous"), stages, str(out)), nprocs=2, join=False,
        start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _train(stages, 0, 1)  # meanwhile, the 1-worker reference in this process
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 300
    try:
        while not context.join(timeout=2):  # raises when a worker raised (DDP's unused-parameter error)
            assert time.monotonic() < deadline, "the DDP workers hang"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    two = torch.load(out, weights_only=False)
    for name in stages:
        for step, (a, b) in enumerate(zip(one[name]["metrics"], two[name]["metrics"], strict=True)):
            assert a.keys() == b.keys()
            for key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), f"{name} step {step} {key}: {a} vs {b}"
        w1, w2, w0 = one[name]["weights"], two[name]["weights"], one[name]["initial"]
        assert w1.keys() == w2.keys()
        moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)
        differ = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        print(f"{name}: weights moved by up to {moved:.2e}; 1 vs 2 workers differ by up to {differ:.2e}")
        assert moved > 1e-3, f"{name}: training moved the weights"
        assert differ <= 1e-2 * moved, f"{name}: 1 vs 2 workers differ by {differ:.2e}; weights moved by {moved:.2e}"
    terms = one["distill"]["metrics"][1]
    assert {"sup", "kd", "feat", "cons", "teacher_0", "teacher_1"} <= set(terms) and terms["feat"] > 0
