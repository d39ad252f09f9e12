"""Hugging Face Hub models: ``cskd-ray push`` writes the Hub folder, ``cskd_ray.load("hf-hub:...")`` reads it from
the local Hugging Face cache, and offline without a cached copy both fail at once. No network: the suite runs with
``HF_HUB_OFFLINE=1`` (conftest) and the cache is a temporary folder in the Hub's own layout."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import constants
from PIL import Image
from test_score import write_model_folder

import cskd_ray
from cskd_ray.app.cli import main
from cskd_ray.io.preflight import check_uri_schemes
from cskd_ray.models.hub import HubError, parse_hub_uri, pin_revision, push_model
from cskd_ray.models.saved import scoring_model_id
from cskd_ray.stages import load_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distill model folder inside a run folder (``RUN/student/model``), as the pipeline lays them out."""
    return write_model_folder(tmp_path_factory.mktemp("run") / "student" / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = [root / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache that this process and its children use, offline."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub when it was imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def install_in_cache(folder: Path, cache: Path, repo_id: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """What ``snapshot_download`` leaves after a download: ``models--org--name/snapshots/<commit>`` and ``refs``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def _push_local(model_dir: Path, out: Path, *extra: str) -> None:
    assert main(["push", str(model_dir), "--repo", "org/name", "--local-dir", str(out), *extra]) == 0


def test_hub_model_scores_as_its_folder(model_dir: Path, images: list[Path], hub_cache: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "hub-folder"
    _push_local(model_dir, folder)
    printed = capsys.readouterr().out
    assert f"written to {folder}" in printed and 'cskd_ray.load("hf-hub:org/name")' in printed
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.json", "model.safetensors"]
    for name in ("model.json", "model.safetensors"):  # the folder's own files, byte for byte: no second format
        assert (folder / name).read_bytes() == (model_dir / name).read_bytes()
    install_in_cache(folder, hub_cache, "org/name")

    local = cskd_ray.load(str(model_dir), device="cpu")
    paths = [str(p) for p in images]
    expected = local.score(paths)
    for uri in ("hf-hub:org/name", "hf-hub:org/name@main", f"hf-hub:org/name@{COMMIT}"):
        hub = cskd_ray.load(uri, device="cpu")
        assert hub.score(paths) == expected  # same weights, same preprocessing: identical floats
        np.testing.assert_array_equal(hub.predict_distribution(paths), local.predict_distribution(paths))
        assert hub.model_id == local.model_id == scoring_model_id(str(model_dir), json.loads(
            (model_dir / "model.json").read_text()))
    assert main(["predict", "hf-hub:org/name", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx(expected, abs=1e-6)


def test_score_stage_takes_a_pinned_hub_model(model_dir: Path, hub_cache: Path, tmp_path: Path) -> None:
    _push_local(model_dir, tmp_path / "hub-folder")
    install_in_cache(tmp_path / "hub-folder", hub_cache, "org/name")
    pinned = pin_revision("hf-hub:org/name")
    assert pinned == f"hf-hub:org/name@{COMMIT}"  # every Ray worker then loads this very commit
    cfg = load_config("score", None, [f"model={pinned}"], input_uris=[str(tmp_path)], output_uri=str(tmp_path / "o"))
    assert cfg.model == pinned  # not turned into a local path
    check_uri_schemes(cfg)  # accepted where local paths and s3:// are


def test_model_card(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "card"
    _push_local(model_dir, folder, "--license", "apache-2.0", "--revision", "v2")
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "cskd_ray"
    assert "image-aesthetics-assessment" in meta["tags"] and "spearmanr" in meta["metrics"]
    sha256 = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    description = json.loads((model_dir / "model.json").read_text())
    pre = description["preprocess"]
    for section in ("## Data", "## Metrics", "## Scale and labels", "## Model", "## Preprocessing", "## How to load"):
        assert section in body
    assert f"sha256 `{sha256}`" in body
    assert f"`{scoring_model_id(str(model_dir), description)}`" in body
    assert f"Input: {pre['image_size']}×{pre['image_size']} RGB" in body
    assert f"mean = {pre['mean']}, std = {pre['std']}" in body and f"Interpolation: {pre['interpolation']}" in body
    assert "Not evaluated" in body and "score bins 1..10" in body
    assert 'cskd_ray.load("hf-hub:org/name@v2")' in body  # the revision pushed to


def test_model_card_reads_the_evaluation_of_these_weights(model_dir: Path, tmp_path: Path) -> None:
    model_id = scoring_model_id(str(model_dir), json.loads((model_dir / "model.json").read_text()))
    run = model_dir.parent.parent
    other = {"model_id": "distill:test_vit:0000000000000000", "srcc": 0.99}
    (run / "evaluate-teacher").mkdir(exist_ok=True)
    (run / "evaluate-teacher" / "metrics.json").write_text(json.dumps(other))  # another model's: ignored
    report = {"model_id": model_id, "labels": "/data/AVA.txt", "split": "test", "images": 45, "scored": 44,
              "threshold": 5.0, "srcc": 0.5123, "krcc": 0.36, "plcc": 0.55, "plcc_logistic": 0.56, "accuracy": 0.7,
              "emd": 0.08}
    (run / "evaluate-student").mkdir(exist_ok=True)
    (run / "evaluate-student" / "metrics.json").write_text(json.dumps(report))
    try:
        _push_local(model_dir, tmp_path / "card")
        body = (tmp_path / "card" / "README.md").read_text()
        assert "| SRCC | 0.5123 |" in body and "| KRCC | 0.3600 |" in body and "| EMD (r = 1) | 0.0800 |" in body
        assert "`AVA.txt`, split `test`: 44 of 45 images" in body and "Not evaluated" not in body
        assert main(["push", str(model_dir), "--repo", "org/name", "--local-dir", str(tmp_path / "x"),
                     "--metrics", str(run / "evaluate-teacher" / "metrics.json")]) == 2
    finally:
        shutil.rmtree(run / "evaluate-teacher")
        shutil.rmtree(run / "evaluate-student")


def test_model_card_reads_the_training_record(model_dir: Path, tmp_path: Path) -> None:
    trained = Path(shutil.copytree(model_dir, tmp_path / "student" / "model"))
    description = json.loads((trained / "model.json").read_text())
    description.update(step=40, metrics={"val_srcc": 0.4, "val_plcc": 0.3, "loss": 1.2}, config={
        "input": "/data/AVA.txt", "labels": {"format": "ava", "val_split": "test"}, "aligned": "/runs/align/model",
        "pseudo_labels": "/runs/pseudo-labels", "kd_weight": 1.0, "feat_weight": 0.5, "consistency_weight": 0.0,
        "extra_teachers": [{"kind": "clip", "name": "ViT-L-14"}]})
    (trained / "model.json").write_text(json.dumps(description))
    _push_local(trained, tmp_path / "card")
    body = (tmp_path / "card" / "README.md").read_text()
    assert "- Trained by the `distill` stage of cskd_ray (40 steps)." in body
    assert "- Labels: `AVA.txt` (format `ava`); rows of split `test` validated" in body
    assert "pseudo-labels `pseudo-labels` (kd_weight 1, feat_weight 0.5, consistency_weight 0)" in body
    assert "- Extra frozen teachers: clip:ViT-L-14." in body
    assert "Validation during training (the kept checkpoint, step 40): plcc 0.3000, srcc 0.4000." in body
    assert "Not evaluated" not in body


def test_push_refuses_what_it_cannot_publish(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["push", str(model_dir), "--repo", "org/name", "--local-dir", str(busy)]) == 2
    assert capsys.readouterr().err == f"error: --local-dir {busy}: holds other files (notes.txt); pass a new or " \
                                      "empty folder\n"
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"format": "onnx"}))
    with pytest.raises(HubError, match=r"an export folder \(onnx\); push takes a PyTorch model folder"):
        push_model(str(export), "org/name", local_dir=str(tmp_path / "out"))
    with pytest.raises(HubError, match=r"hf-hub:org/: expected hf-hub:org/name or hf-hub:org/name@revision"):
        parse_hub_uri("hf-hub:org/")
    # offline, the real client refuses at once, and the message says how to write the folder without the Hub
    assert main(["push", str(model_dir), "--repo", "org/name"]) == 2
    assert "HF_HUB_OFFLINE=1 is set; unset it, or only write the folder with --local-dir" in capsys.readouterr().err


def test_push_uploads_one_commit(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, **kwargs: object) -> None:
            calls.append(("init", kwargs))

        def create_repo(self, repo_id: str, **kwargs: object) -> str:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id: str, **kwargs: object) -> None:
            calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs: object) -> huggingface_hub.CommitInfo:
            calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"])
                                                                       .iterdir())}))
            return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/org/name/commit/abc",
                                              commit_message="", commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = push_model(str(model_dir), "org/name", private=True, revision="v1")
    names = [name for name, _ in calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert calls[1][1] == {"repo_id": "org/name", "private": True, "exist_ok": True}
    assert calls[2][1] == {"repo_id": "org/name", "branch": "v1", "exist_ok": True}
    upload = calls[3][1]
    assert upload["repo_id"] == "org/name" and upload["revision"] == "v1"
    assert upload["files"] == ["README.md", "model.json", "model.safetensors"]
    assert result.url == "https://huggingface.co/org/name" and result.commit == "abc"
    assert result.model.uri == "hf-hub:org/name@v1" and not Path(upload["folder_path"]).exists()  # temp folder gone


def test_offline_and_not_cached_fails_fast(hub_cache: Path, images: list[Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    with pytest.raises(HubError, match=r"^hf-hub:org/missing: the model is not in the local Hugging Face cache "
                                       r"\(.*\) and the Hub cannot be reached \(HF_HUB_OFFLINE=1 is set\)"):
        cskd_ray.load("hf-hub:org/missing", device="cpu")
    assert main(["predict", "hf-hub:org/missing", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hf-hub:org/missing: the model is not in the local Hugging Face cache (")
    assert "HF_HUB_OFFLINE=1 is set" in err and len(err.splitlines()) == 1
    assert main(["score", "--model", "hf-hub:org/missing@v3", "--input", str(images[0].parent),
                 "--output", str(tmp_path / "scores")]) == 2  # before Ray starts
    assert capsys.readouterr().err.startswith("error: hf-hub:org/missing@v3: the model is not in the local")
    assert time.perf_counter() - start < 5
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "README.md").write_text("hello")
    install_in_cache(tmp_path / "not-a-model", hub_cache, "org/empty")  # a cached repo without a model
    with pytest.raises(HubError, match="holds no cskd_ray model"):
        cskd_ray.load("hf-hub:org/empty")
