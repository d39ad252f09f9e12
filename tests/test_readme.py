"""The README's Python API snippet runs as written (names for its placeholders only) and scores as documented."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_score import write_model_folder

REPO = Path(__file__).resolve().parents[1]
SNIPPET_MODEL = "runs/demo/student/model"


def _python_api_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Scoring a few images without Ray", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(import cskd_ray\n.*?)```", section, re.S)
    assert match, "README: the 'Scoring a few images without Ray' section lost its Python snippet"
    return match.group(1)


def test_readme_python_api_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_model_folder(tmp_path / SNIPPET_MODEL)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=92)
    monkeypatch.chdir(tmp_path)  # the snippet's relative paths (model folder, photo.jpg) resolve here
    snippet = _python_api_snippet()
    assert SNIPPET_MODEL in snippet and '"photo.jpg"' in snippet
    # only the snippet's placeholders are supplied; everything else is the README's own code
    namespace: dict = {"pil_image": photo, "numpy_rgb_array": np.asarray(photo)}
    lines = snippet.strip().splitlines()
    results = []
    for line in lines:
        code = line.split("  #", 1)[0].rstrip()
        if code.startswith(("import ", "model =")):
            exec(code, namespace)  # noqa: S102
        elif code:
            results.append(eval(code, namespace))  # noqa: S307 - the README's own expressions
    single, batch, distribution = results
    assert isinstance(single, float) and 1.0 <= single <= 10.0  # a float on AVA's 1..10 scale
    assert isinstance(batch, list) and len(batch) == 2 and all(isinstance(s, float) for s in batch)
    assert batch[0] == pytest.approx(batch[1], rel=1e-5)  # the same pixels as PIL image and as numpy array
    assert np.shape(distribution) == (10,) and float(np.sum(distribution)) == pytest.approx(1.0, abs=1e-5)
    assert folder.is_dir() and (folder / "model.safetensors").is_file()
