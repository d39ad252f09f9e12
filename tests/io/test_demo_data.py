"""Tests for the synthetic demo data generator (cskd_ray.io.demo)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats

from cskd_ray.io.demo import (
    DemoDataSummary,
    SceneParams,
    hidden_score,
    make_demo_data,
    render_image,
    sample_params,
)

NUM_IMAGES = 40
LABELED_FRACTION = 0.5
NUM_CORRUPT = 5


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ava_rows(path: str | Path) -> list[list[int]]:
    return [[int(v) for v in line.split(" ")] for line in Path(path).read_text().splitlines()]


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoDataSummary]:
    out = tmp_path_factory.mktemp("demo")
    summary = make_demo_data(out, NUM_IMAGES, LABELED_FRACTION, seed=3, image_size=64,
                             num_corrupt=NUM_CORRUPT)
    return out, summary


def test_summary_and_layout(demo_dir: tuple[Path, DemoDataSummary]) -> None:
    out, summary = demo_dir
    assert summary.output == str(out.resolve())
    assert summary.num_images == NUM_IMAGES
    assert summary.num_labeled == round(LABELED_FRACTION * NUM_IMAGES)
    assert summary.num_corrupt == NUM_CORRUPT
    assert summary.num_test == round(0.3 * summary.num_labeled)
    assert summary.ava_path == str(out.resolve() / "AVA.txt")
    assert summary.test_list_path == str(out.resolve() / "test.jpgl")
    assert summary.images_dir == str(out.resolve() / "images")
    for name in ("AVA.txt", "test.jpgl", "manifest.csv", "labeled.csv", "unlabeled.csv", "README.txt"):
        assert (out / name).is_file(), name
    assert len(list((out / "images").glob("*.jpg"))) == NUM_IMAGES + NUM_CORRUPT
    assert not list(out.rglob("*.tmp"))
    readme = (out / "README.txt").read_text()
    assert "seed=3" in readme and "composition" in readme


def test_ava_format(demo_dir: tuple[Path, DemoDataSummary]) -> None:
    out, summary = demo_dir
    lines = (out / "AVA.txt").read_text().splitlines()
    assert len(lines) == round(LABELED_FRACTION * NUM_IMAGES)
    rows = _ava_rows(out / "AVA.txt")
    for index, row in enumerate(rows, start=1):
        assert len(row) == 15
        assert row[0] == index
        assert 100_000 <= row[1] < 100_000 + NUM_IMAGES
        assert 60 <= sum(row[2:12]) <= 250
        assert all(c >= 0 for c in row[2:12])
        assert all(0 <= t <= 65 for t in row[12:14])
        assert 1 <= row[14] <= 1400
        assert (out / "images" / f"{row[1]}.jpg").is_file()
    ids = [row[1] for row in rows]
    assert ids == sorted(set(ids))
    test_ids = [int(v) for v in (out / "test.jpgl").read_text().split()]
    assert len(test_ids) == summary.num_test > 0
    assert set(test_ids) <= set(ids)


def test_manifests(demo_dir: tuple[Path, DemoDataSummary]) -> None:
    out, _ = demo_dir
    manifest = _read_csv(out / "manifest.csv")
    assert list(manifest[0]) == ["uri", "image_id", "labeled", "split", "hidden_score"]
    assert len(manifest) == NUM_IMAGES + NUM_CORRUPT
    ava_ids = {row[1] for row in _ava_rows(out / "AVA.txt")}
    test_ids = {int(v) for v in (out / "test.jpgl").read_text().split()}
    for row in manifest:
        image_id = int(row["image_id"])
        assert Path(row["uri"]).is_absolute() and Path(row["uri"]).is_file()
        assert Path(row["uri"]).name == f"{image_id}.jpg"
        if row["split"] == "corrupt":
            assert row["labeled"] == "false" and row["hidden_score"] == ""
            assert image_id >= 100_000 + NUM_IMAGES
            continue
        assert 1.0 <= float(row["hidden_score"]) <= 10.0
        assert (row["labeled"] == "true") == (image_id in ava_ids)
        expected = ("test" if image_id in test_ids else "train") if image_id in ava_ids else "unlabeled"
        assert row["split"] == expected
    labeled = [r["uri"] for r in _read_csv(out / "labeled.csv")]
    unlabeled = [r["uri"] for r in _read_csv(out / "unlabeled.csv")]
    assert labeled == [r["uri"] for r in manifest if r["labeled"] == "true"]
    assert unlabeled == [r["uri"] for r in manifest if r["labeled"] == "false"]
    assert len(unlabeled) == NUM_IMAGES - len(ava_ids) + NUM_CORRUPT


def test_images_and_corrupt_files(demo_dir: tuple[Path, DemoDataSummary]) -> None:
    out, _ = demo_dir
    manifest = _read_csv(out / "manifest.csv")
    ava_ids = {row[1] for row in _ava_rows(out / "AVA.txt")}
    good = [r for r in manifest if r["split"] != "corrupt"]
    for row in good[:5]:
        with Image.open(row["uri"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    corrupt = [r for r in manifest if r["split"] == "corrupt"]
    assert len(corrupt) == NUM_CORRUPT
    assert not {int(r["image_id"]) for r in corrupt} & ava_ids
    sizes = [Path(r["uri"]).stat().st_size for r in corrupt]
    assert sizes[0] == 0 and sizes[4] == 0
    assert Path(corrupt[1]["uri"]).read_bytes()[:2] == b"\xff\xd8"
    assert Path(corrupt[2]["uri"]).read_bytes().isascii()
    for row in corrupt:
        with pytest.raises(OSError):
            with Image.open(row["uri"]) as img:
                img.load()


def test_deterministic_and_rerun_safe(tmp_path: Path, demo_dir: tuple[Path, DemoDataSummary]) -> None:
    ref, _ = demo_dir
    out = tmp_path / "again"
    make_demo_data(out, NUM_IMAGES, LABELED_FRACTION, seed=3, image_size=64, num_corrupt=NUM_CORRUPT)
    strip = str(out.resolve()).encode(), str(ref.resolve()).encode()
    fresh = {k: v.replace(*strip) for k, v in _all_bytes(out).items()}
    assert fresh == _all_bytes(ref)
    # Rerunning into the same directory with fewer images overwrites files and drops stale images.
    make_demo_data(out, 10, 0.5, seed=3, image_size=64)
    assert len(list((out / "images").glob("*.jpg"))) == 10
    assert len(_read_csv(out / "manifest.csv")) == 10
    assert (out / "images" / "100000.jpg").read_bytes() == (ref / "images" / "100000.jpg").read_bytes()


def test_workers_identical(tmp_path: Path) -> None:
    one, two = tmp_path / "w1", tmp_path / "w2"
    make_demo_data(one, 24, 0.5, seed=11, image_size=48, num_corrupt=2, workers=1)
    make_demo_data(two, 24, 0.5, seed=11, image_size=48, num_corrupt=2, workers=2)
    a, b = _all_bytes(one), _all_bytes(two)
    strip = str(two.resolve()).encode(), str(one.resolve()).encode()
    assert a == {k: v.replace(*strip) for k, v in b.items()}


def test_different_seed_differs(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "s0", 12, 0.5, seed=0, image_size=48)
    make_demo_data(tmp_path / "s1", 12, 0.5, seed=1, image_size=48)
    for name in ("AVA.txt", "images/100000.jpg"):
        assert (tmp_path / "s0" / name).read_bytes() != (tmp_path / "s1" / name).read_bytes()


def test_mean_vote_tracks_hidden_score(tmp_path: Path) -> None:
    make_demo_data(tmp_path, 300, 1.0, seed=5, image_size=16, test_fraction=0.2)
    scores = {int(r["image_id"]): float(r["hidden_score"]) for r in _read_csv(tmp_path / "manifest.csv")}
    rows = _ava_rows(tmp_path / "AVA.txt")
    counts = np.array([row[2:12] for row in rows], dtype=float)
    mean_votes = counts @ np.arange(1, 11) / counts.sum(axis=1)
    hidden = np.array([scores[row[1]] for row in rows])
    assert np.corrcoef(mean_votes, hidden)[0, 1] > 0.95
    assert mean_votes.std() > 0.5
    assert 4.8 < mean_votes.mean() < 6.0


def test_hidden_score_distribution_and_monotonicity() -> None:
    params = [sample_params(np.random.default_rng([0, i])) for i in range(3000)]
    scores = np.array([hidden_score(p) for p in params])
    assert 5.1 < scores.mean() < 5.7
    assert 0.7 < scores.std() < 1.4
    assert np.percentile(scores, 2) > 2.5 and np.percentile(scores, 98) < 8.5
    best = SceneParams(0.0, 1.3, 1.4, 0.0, 1 / 3, 1 / 3, 0.0, 0, 0.5, 0, 0.12, 2, 7)
    base = hidden_score(best)
    for change in ({"exposure_ev": 1.5}, {"exposure_ev": -1.5}, {"contrast": 0.5}, {"saturation": 0.1},
                   {"blur_sigma": 2.5}, {"subject_x": 0.5, "subject_y": 0.5}, {"noise_sigma": 0.08}):
        assert hidden_score(SceneParams(**{**best.__dict__, **change})) < base - 0.4, change
    nuisance = {"scene_type": 2, "hue": 0.1, "subject_shape": 1, "subject_size": 0.16, "texture_seed": 9}
    assert hidden_score(SceneParams(**{**best.__dict__, **nuisance})) == base


def test_render_image_deterministic() -> None:
    params = sample_params(np.random.default_rng(1))
    a, b = render_image(params, 64), render_image(params, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _pixel_features(path: str) -> list[float]:
    """Hand-crafted statistics: exposure, contrast, colourfulness, sharpness, noise, composition."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    sharpness = np.log(ndimage.laplace(lum).var() + 1e-6)
    noise = np.log(np.median(np.abs(lum - ndimage.median_filter(lum, size=3))) + 1e-4)
    smooth = ndimage.gaussian_filter(lum, 1.5)
    edges = np.log(np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)).mean() + 1e-6)
    opponent = np.concatenate([lum[..., None], 2.0 * (rgb - rgb.mean(axis=2, keepdims=True))], axis=2)
    centre = ndimage.gaussian_filter(opponent, (4, 4, 0))
    saliency = np.abs(centre - ndimage.gaussian_filter(opponent, (16, 16, 0), mode="nearest")).sum(axis=2)
    y, x = np.unravel_index(np.argmax(saliency), saliency.shape)
    h, w = lum.shape
    thirds = min(np.hypot(x / w - tx, y / h - ty) for tx in (1 / 3, 2 / 3) for ty in (1 / 3, 2 / 3))
    clipped = np.mean(lum > 0.97) + np.mean(lum < 0.03)
    return [lum.mean(), lum.std(), colourfulness, sharpness, noise, edges, thirds, clipped]


def _quadratic_ridge(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     lam: float = 3.0) -> np.ndarray:
    """Ridge regression on standardised features plus all their pairwise products."""
    def expand(x: np.ndarray) -> np.ndarray:
        iu = np.triu_indices(x.shape[1])
        return np.hstack([x, (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]])

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-9
    a, b = expand((train_x - mu) / sd), expand((test_x - mu) / sd)
    amu, asd = a.mean(0), a.std(0) + 1e-9
    a, b = (a - amu) / asd, (b - amu) / asd
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (train_y - train_y.mean()))
    return b @ w + train_y.mean()


def test_score_is_learnable_from_pixels(tmp_path: Path) -> None:
    make_demo_data(tmp_path, 400, 0.0, seed=21, image_size=64)
    manifest = _read_csv(tmp_path / "manifest.csv")
    feats = np.array([_pixel_features(r["uri"]) for r in manifest])
    scores = np.array([float(r["hidden_score"]) for r in manifest])
    pred = _quadratic_ridge(feats[:300], scores[:300], feats[300:])
    srcc = stats.spearmanr(pred, scores[300:]).statistic
    print(f"pixel-feature ridge SRCC on 100 held-out images: {srcc:.3f}")
    assert srcc > 0.6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_images": 0}, "num_images"),
        ({"labeled_fraction": -0.1}, "labeled_fraction"),
        ({"labeled_fraction": 1.5}, "labeled_fraction"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"num_corrupt": -1}, "num_corrupt"),
        ({"workers": 0}, "workers"),
        ({"image_size": 4}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"num_images": 2.5}, "num_images"),
        ({"labeled_fraction": float("nan")}, "labeled_fraction"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict[str, float], name: str) -> None:
    args = {"output": tmp_path / "bad", "num_images": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        make_demo_data(**args)
    assert not (tmp_path / "bad").exists()
