"""Honest splits: a validation split carved from the training rows; test rows never train or validate."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cskd_ray.io.labels import LabelsConfig, carve_validation, in_validation_carve, load_labels


def test_carve_depends_on_the_image_id_only_and_grows_with_the_fraction() -> None:
    assert in_validation_carve("/a/b/100123.jpg", 0.3) == in_validation_carve("s3://x/100123.png", 0.3)
    ids = [f"{100_000 + i}.jpg" for i in range(2000)]
    small = {i for i in ids if in_validation_carve(i, 0.1)}
    large = {i for i in ids if in_validation_carve(i, 0.3)}
    assert small < large and 0.08 < len(small) / 2000 < 0.12 and 0.27 < len(large) / 2000 < 0.33
    assert not any(in_validation_carve(i, 0.0) for i in ids)


def test_carve_never_takes_test_rows(demo_data: Path) -> None:
    table = load_labels("ava", str(demo_data / "AVA.txt"), str(demo_data / "images"),
                        test_list=str(demo_data / "test.jpgl"))
    carved = carve_validation(table, 0.5)
    before, after = table.column("split").to_pylist(), carved.column("split").to_pylist()
    assert [s == "test" for s in before] == [s == "test" for s in after]
    assert "val" in after and set(after) == {"train", "val", "test"}
    manifest = (demo_data / "manifest.csv").read_text()  # the generator marks the same rows (none by default)
    assert ",val," not in manifest


def test_val_fraction_needs_val_split() -> None:
    with pytest.raises(ValidationError, match=r"labels.val_fraction=0.2 carves split 'val'.*set labels.val_split=val"):
        LabelsConfig(val_fraction=0.2)
    assert LabelsConfig(val_fraction=0.2, val_split="val").val_fraction == 0.2
