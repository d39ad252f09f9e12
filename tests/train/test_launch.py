"""What a TorchTrainer carries to its controller is light: unpickling it imports no torch, timm or open_clip."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from cskd_ray.train.launch import TaskFactory


def test_trainer_payload_unpickles_without_the_model_stack() -> None:
    """The controller and Ray Data's coordinator unpickle the loop, the task factory and the decode steps."""
    from cskd_ray.train import ingest
    from cskd_ray.train.launch import train_worker_loop

    payload = pickle.dumps((train_worker_loop, TaskFactory("cskd_ray.train.align", "AlignTask", {"clip_dim": 32}),
                            ingest.decode_cached_rows, ingest.decode_labeled, ingest.decode_mixed))
    code = ("import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
            "print(sorted(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=60, check=True)
    assert done.stdout.decode().strip() == "[]", done.stdout + done.stderr


def test_task_factory_builds_the_named_task_with_its_arguments() -> None:
    factory = TaskFactory("collections", "OrderedDict", {"b": 2})
    assert factory([("a", 1)]) == {"a": 1, "b": 2}
    assert pickle.loads(pickle.dumps(factory)) == factory
    with pytest.raises(AttributeError):
        TaskFactory("collections", "NoSuchTask")({})
