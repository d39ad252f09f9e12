"""The pipeline's checks that must fail before its first stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cskd_ray.app.pipeline import load_pipeline_config, run_pipeline
from cskd_ray.config import ConfigError


def test_a_label_file_without_a_test_split_fails_before_any_stage(tmp_path: Path) -> None:
    votes = " ".join(["1"] * 10)
    (tmp_path / "AVA.txt").write_text("".join(f"{i} {100 + i} {votes} 0 0 1\n" for i in range(1, 4)))
    cfg = load_pipeline_config(None, [f"label_file={tmp_path / 'AVA.txt'}", "labels.format=ava",
                                      f"labels.images_root={tmp_path}"],
                               input_uris=[str(tmp_path)], output_uri=str(tmp_path / "run"))
    said: list[str] = []
    with pytest.raises(ConfigError, match=r"no rows in split 'test'.*labels.test_list"):
        run_pipeline(cfg, said.append)
    assert not said and not (tmp_path / "run").exists()  # nothing ran, nothing written
