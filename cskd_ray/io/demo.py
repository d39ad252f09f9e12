"""Deterministic synthetic AVA-style demo data whose aesthetic score is hidden in the pixels.

Every image is rendered from a :class:`SceneParams` sample: a photo-like scene (sky/ground, studio or
textured background, a shaded main subject and a few secondary shapes) that is normalised to a fixed
luminance mean/std and chroma, then degraded in a fixed order: contrast gain, exposure shift, saturation
gain, gaussian blur, additive gaussian noise. Only those degradations and the subject position enter the
score; palette, scene type, shapes and texture are nuisance factors.

Hidden function (each quality term lies in [0, 1]; ``d`` is the distance of the subject centre from the
nearest rule-of-thirds point in image-width units)::

    q_exp   = exp(-(exposure_ev / 0.8) ** 2)          # best at neutral exposure
    q_con   = exp(-((contrast - 1.3) / 0.5) ** 2)     # best at moderately high contrast
    q_sat   = exp(-((saturation - 1.4) / 0.7) ** 2)   # best at moderately high colourfulness
    q_sharp = exp(-blur_sigma / 1.0)                   # sharp is best
    q_comp  = exp(-(d / 0.12) ** 2)                    # subject near a thirds point
    q_noise = exp(-noise_sigma / 0.035)                # low noise is best
    score = 2.0 + 1.5 q_exp + 1.0 q_con + 1.0 q_sat + 1.2 q_sharp + 0.8 q_comp + 1.0 q_noise
                + 0.6 q_exp * q_sharp * q_noise        # clipped to [1, 10]

Sampled scores spread over roughly 2.5-8 with mean about 5.4. Labels are AVA vote histograms drawn from
a discretised normal around the score, so the mean vote tracks the score closely.
"""

from __future__ import annotations

import colorsys
import csv
import io
import math
import numbers
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cskd_ray.io.labels import in_validation_carve

ID_OFFSET = 100_000
_SPLIT_STREAM = 0x5EED_0001
_CORRUPT_STREAM = 0x5EED_0002
_THIRDS = (1 / 3, 2 / 3)


@dataclass(frozen=True)
class SceneParams:
    """Hidden properties of one demo image (the first seven drive the score, the rest are nuisance)."""

    exposure_ev: float  # exposure shift in stops; intensities are scaled by 2 ** (ev / 2.2)
    contrast: float  # gain around mid grey (1 = unchanged)
    saturation: float  # chroma gain (1 = unchanged, 0 = greyscale)
    blur_sigma: float  # gaussian blur sigma in pixels at 128 px (scaled with image size)
    subject_x: float  # subject centre, fraction of the width
    subject_y: float  # subject centre, fraction of the height
    noise_sigma: float  # sd of additive gaussian noise on the 0..1 intensity scale
    scene_type: int  # 0 landscape, 1 studio, 2 texture
    hue: float  # palette base hue in [0, 1)
    subject_shape: int  # 0 ellipse, 1 rectangle, 2 blob
    subject_size: float  # subject radius, fraction of the width
    num_secondary: int  # number of secondary shapes
    texture_seed: int  # seed for background texture, shape layout and noise

    @property
    def thirds_distance(self) -> float:
        """Distance of the subject centre from the nearest rule-of-thirds point."""
        return min(math.hypot(self.subject_x - tx, self.subject_y - ty) for tx in _THIRDS for ty in _THIRDS)


@dataclass(frozen=True)
class DemoDataSummary:
    """What :func:`make_demo_data` wrote."""

    output: str
    num_images: int
    num_labeled: int
    num_test: int
    num_corrupt: int
    ava_path: str
    test_list_path: str
    images_dir: str


def hidden_score(params: SceneParams) -> float:
    """Returns the hidden aesthetic score (1..10 scale) of a scene; see the module docstring."""
    q_exp = math.exp(-((params.exposure_ev / 0.8) ** 2))
    q_con = math.exp(-(((params.contrast - 1.3) / 0.5) ** 2))
    q_sat = math.exp(-(((params.saturation - 1.4) / 0.7) ** 2))
    q_sharp = math.exp(-params.blur_sigma / 1.0)
    q_comp = math.exp(-((params.thirds_distance / 0.12) ** 2))
    q_noise = math.exp(-params.noise_sigma / 0.035)
    score = 2.0 + 1.5 * q_exp + 1.0 * q_con + 1.0 * q_sat + 1.2 * q_sharp + 0.8 * q_comp + 1.0 * q_noise
    score += 0.6 * q_exp * q_sharp * q_noise
    return float(min(10.0, max(1.0, score)))


def sample_params(rng: np.random.Generator) -> SceneParams:
    """Draws scene parameters; the distributions put about half the images near each optimum."""
    sharp = rng.random() < 0.45
    clean = rng.random() < 0.45
    return SceneParams(
        exposure_ev=float(np.clip(rng.normal(0.0, 0.9), -2.2, 2.2)),
        contrast=float(rng.uniform(0.45, 2.0)),
        saturation=float(rng.uniform(0.0, 2.4)),
        blur_sigma=float(rng.uniform(0.0, 0.3) if sharp else rng.uniform(0.3, 3.5)),
        subject_x=float(rng.uniform(0.15, 0.85)),
        subject_y=float(rng.uniform(0.15, 0.85)),
        noise_sigma=float(rng.uniform(0.0, 0.008) if clean else rng.uniform(0.008, 0.11)),
        scene_type=int(rng.integers(0, 3)),
        hue=float(rng.random()),
        subject_shape=int(rng.integers(0, 3)),
        subject_size=float(rng.uniform(0.1, 0.17)),
        num_secondary=int(rng.integers(1, 5)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Returns a size x size field in ~[0, 1] by bicubic upsampling of a cells x cells random grid."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _shape_mask(kind: int, cx: float, cy: float, r: float, aspect: float, phase: float,
                xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """Returns an anti-aliased (about 1 px edge) mask of an ellipse, rectangle or blob."""
    dx, dy = (xx - cx) / r, (yy - cy) / (r * aspect)
    if kind == 1:
        dist = np.maximum(np.abs(dx), np.abs(dy))
    else:
        dist = np.sqrt(dx * dx + dy * dy)
        if kind == 2:
            dist = dist / (1.0 + 0.25 * np.sin(3.0 * np.arctan2(dy, dx) + phase))
    return np.clip((1.0 - dist) * r * size, 0.0, 1.0)[..., None]


def _background(p: SceneParams, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray,
                size: int) -> np.ndarray:
    """Renders the background (sky/ground landscape, studio vignette or two-colour texture)."""
    field = _smooth_noise(rng, size, 4)[..., None]
    if p.scene_type == 0:
        horizon = rng.uniform(0.35, 0.65) + 0.08 * (_smooth_noise(rng, size, 3)[:1].T - 0.5)
        sky = _hsv(p.hue, 0.45, 0.95) * (1 - yy[..., None]) + _hsv(p.hue + 0.05, 0.2, 0.75) * yy[..., None]
        ground = _hsv(p.hue + 0.3, 0.6, 0.45) * (0.7 + 0.6 * field)
        return np.where((yy < horizon.T)[..., None], sky, ground)
    if p.scene_type == 1:
        r2 = (xx - 0.5) ** 2 + (yy - 0.45) ** 2
        return _hsv(p.hue, 0.35, 0.8) * (1.0 - 1.4 * r2)[..., None] * (0.9 + 0.2 * field)
    return _hsv(p.hue, 0.5, 0.3) * (1 - field) + _hsv(p.hue + 0.15, 0.5, 0.85) * field


def _scene(p: SceneParams, size: int, rng: np.random.Generator) -> np.ndarray:
    """Renders the undegraded scene, normalised to luminance mean 0.45, std 0.2 and fixed chroma."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = axis[None, :], axis[:, None]
    img = _background(p, rng, xx, yy, size)
    for _ in range(p.num_secondary):
        mask = _shape_mask(int(rng.integers(0, 3)), rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95),
                           rng.uniform(0.03, 0.06), rng.uniform(0.6, 1.5), rng.uniform(0, 6.3), xx, yy, size)
        img = img * (1 - mask) + _hsv(p.hue + rng.uniform(0.2, 0.8), 0.5, rng.uniform(0.3, 0.8)) * mask
    cx, cy, r = p.subject_x, p.subject_y, p.subject_size
    mask = _shape_mask(p.subject_shape, cx, cy, r, rng.uniform(0.7, 1.4), rng.uniform(0, 6.3), xx, yy, size)
    bg_lum = float((img.mean(axis=2, keepdims=True) * mask).sum() / max(mask.sum(), 1.0))
    shade = np.clip(1.1 - 0.3 * ((xx - cx) + (yy - cy)) / r, 0.6, 1.3)[..., None]
    subject = _hsv(p.hue + 0.5, 0.8, 0.2 if bg_lum > 0.55 else 0.95) * shade
    img = img * (1 - mask) + subject * mask
    img = img * (0.92 + 0.16 * _smooth_noise(rng, size, max(4, size // 4))[..., None])
    lum = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = (img - lum.mean()) * (0.2 / (lum.std() + 1e-6)) + 0.45
    lum = (lum - lum.mean()) * (0.2 / (lum.std() + 1e-6)) + 0.45
    chroma = img - lum[..., None]
    chroma *= 0.1 / (float(np.sqrt((chroma**2).sum(axis=2)).mean()) + 1e-6)
    return np.clip(lum[..., None] + chroma, 0.0, 1.0)


def render_image(params: SceneParams, size: int) -> Image.Image:
    """Renders a ``size`` x ``size`` RGB image: scene, then contrast, exposure, saturation, blur, noise."""
    rng = np.random.default_rng(params.texture_seed)
    img = _scene(params, size, rng)
    img = (img - 0.45) * params.contrast + 0.45
    img = img * 2.0 ** (params.exposure_ev / 2.2)
    lum = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    img = lum + (img - lum) * params.saturation
    pil = Image.fromarray(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))
    radius = params.blur_sigma * size / 128
    if radius > 0.05:
        pil = pil.filter(ImageFilter.GaussianBlur(radius))
    if params.noise_sigma <= 0:
        return pil
    noisy = np.asarray(pil, dtype=np.float32) + rng.normal(0, params.noise_sigma * 255, (size, size, 3))
    return Image.fromarray(np.rint(np.clip(noisy, 0, 255)).astype(np.uint8))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temp file next to ``path`` and renames it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _generate_chunk(images_dir: str, seed: int, size: int, start: int, stop: int) -> list[tuple]:
    """Renders and writes images ``start..stop-1``; returns ``(id, score, counts, tags, challenge)`` rows."""
    rows = []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        params = sample_params(rng)
        score = hidden_score(params)
        votes = np.clip(np.rint(rng.normal(score, rng.uniform(1.2, 1.6), int(rng.integers(60, 251)))), 1, 10)
        counts = np.bincount(votes.astype(np.int64), minlength=11)[1:].tolist()
        tags, challenge = rng.integers(0, 66, 2).tolist(), int(rng.integers(1, 1401))
        _atomic_write(Path(images_dir) / f"{ID_OFFSET + i}.jpg", _jpeg_bytes(render_image(params, size)))
        rows.append((ID_OFFSET + i, score, counts, tags, challenge))
    return rows


def _corrupt_bytes(kind: int, rng: np.random.Generator, size: int) -> bytes:
    """Returns a zero-byte, truncated-JPEG, text or random-bytes payload (``kind`` 0..3)."""
    if kind == 0:
        return b""
    if kind == 1:
        data = _jpeg_bytes(render_image(sample_params(rng), size))
        return data[: int(len(data) * 0.4)]
    if kind == 2:
        return b"This is not a JPEG image; it is a deliberately corrupt demo file.\n"
    return b"\x00" + rng.bytes(2047)


def _validate(num_images: int, labeled_fraction: float, seed: int, image_size: int, test_fraction: float,
              num_corrupt: int, workers: int) -> None:
    """Raises a ValueError naming the first out-of-range argument."""
    def is_int(v: object) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def in_range(v: object, lo: float, hi: float, closed: bool) -> bool:
        return isinstance(v, numbers.Real) and (lo <= v <= hi if closed else lo < v < hi)

    checks = [("num_images", num_images, is_int(num_images) and num_images >= 1, "an int >= 1"),
              ("labeled_fraction", labeled_fraction, in_range(labeled_fraction, 0, 1, True), "in [0, 1]"),
              ("seed", seed, is_int(seed) and seed >= 0, "an int >= 0"),
              ("image_size", image_size, is_int(image_size) and image_size >= 16, "an int >= 16"),
              ("test_fraction", test_fraction, in_range(test_fraction, 0, 1, False), "in (0, 1)"),
              ("num_corrupt", num_corrupt, is_int(num_corrupt) and num_corrupt >= 0, "an int >= 0"),
              ("workers", workers, is_int(workers) and workers >= 1, "an int >= 1")]
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}")


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def make_demo_data(output: str | Path, num_images: int, labeled_fraction: float = 0.1, seed: int = 0, *,
                   image_size: int = 128, test_fraction: float = 0.3, num_corrupt: int = 0,
                   workers: int = 1, val_fraction: float = 0.0) -> DemoDataSummary:
    """Generates demo images, AVA.txt labels, a test list, manifests and a README under ``output``.

    Args:
        output: Output directory (created if missing; rerunning overwrites it deterministically).
        num_images: Number of valid images to generate.
        labeled_fraction: Fraction of images that get AVA vote labels.
        seed: Seed; identical arguments give byte-identical output.
        image_size: Side length of the square images in pixels.
        test_fraction: Fraction of the labeled images listed in test.jpgl.
        num_corrupt: Number of extra broken image files (listed as unlabeled, split "corrupt").
        workers: Number of worker processes; the output does not depend on it.
        val_fraction: Fraction of the labeled non-test images marked ``val`` in manifest.csv, chosen as the
            stages choose them with ``labels.val_fraction`` (:func:`cskd_ray.io.labels.in_validation_carve`);
            AVA.txt does not carry splits, so this only documents which rows validate.

    Returns:
        A summary with the counts and the main paths.

    Raises:
        ValueError: If an argument is out of range; the message names the argument.
    """
    _validate(num_images, labeled_fraction, seed, image_size, test_fraction, num_corrupt, workers)
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    out = Path(output).resolve()
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    chunk = max(1, math.ceil(num_images / (workers * 4)))
    bounds = [(s, min(s + chunk, num_images)) for s in range(0, num_images, chunk)]
    if workers == 1:
        parts = [_generate_chunk(str(images_dir), seed, image_size, a, b) for a, b in bounds]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_generate_chunk, str(images_dir), seed, image_size, *ab) for ab in bounds]
            parts = [f.result() for f in futures]
    rows = [row for part in parts for row in part]
    split_rng = np.random.default_rng([seed, _SPLIT_STREAM])
    num_labeled = round(labeled_fraction * num_images)
    labeled = set(split_rng.permutation(num_images)[:num_labeled].tolist())
    num_test = min(max(round(test_fraction * num_labeled), 1), num_labeled - 1) if num_labeled >= 2 else 0
    labeled_sorted = sorted(labeled)
    test = {labeled_sorted[k] for k in split_rng.permutation(num_labeled)[:num_test].tolist()}
    corrupt_ids = [ID_OFFSET + num_images + j for j in range(num_corrupt)]
    for j, image_id in enumerate(corrupt_ids):
        payload = _corrupt_bytes(j % 4, np.random.default_rng([seed, _CORRUPT_STREAM, j]), image_size)
        _atomic_write(images_dir / f"{image_id}.jpg", payload)
    keep = {r[0] for r in rows} | set(corrupt_ids)
    for stale in images_dir.glob("*.jpg"):
        if stale.stem.isdigit() and int(stale.stem) not in keep:
            stale.unlink()
    _write_tables(out, images_dir, rows, labeled, test, corrupt_ids, seed, image_size, val_fraction)
    return DemoDataSummary(str(out), num_images, num_labeled, num_test, num_corrupt, str(out / "AVA.txt"),
                           str(out / "test.jpgl"), str(images_dir))


def _write_tables(out: Path, images_dir: Path, rows: list[tuple], labeled: set[int], test: set[int],
                  corrupt_ids: list[int], seed: int, image_size: int, val_fraction: float = 0.0) -> None:
    """Writes AVA.txt, test.jpgl, manifest.csv, labeled.csv, unlabeled.csv and README.txt atomically."""
    ava, manifest, lab_uris, unlab_uris = [], [], [], []
    for i, (image_id, score, counts, tags, challenge) in enumerate(rows):
        uri = str(images_dir / f"{image_id}.jpg")
        split = ("test" if i in test else "train") if i in labeled else "unlabeled"
        if split == "train" and in_validation_carve(uri, val_fraction):
            split = "val"
        manifest.append([uri, image_id, "true" if i in labeled else "false", split, f"{score:.4f}"])
        (lab_uris if i in labeled else unlab_uris).append([uri])
        if i in labeled:
            fields = [len(ava) + 1, image_id, *counts, *tags, challenge]
            ava.append(" ".join(str(v) for v in fields))
    for image_id in corrupt_ids:
        uri = str(images_dir / f"{image_id}.jpg")
        manifest.append([uri, image_id, "false", "corrupt", ""])
        unlab_uris.append([uri])
    test_ids = [ID_OFFSET + i for i in sorted(test)]
    readme = (
        f"Synthetic AVA-style demo data generated by cskd_ray.io.demo (seed={seed}, {image_size} px).\n"
        f"{len(rows)} images in images/, {len(labeled)} labeled in AVA.txt (official AVA format), "
        f"{len(test)} of them listed in test.jpgl, {len(corrupt_ids)} deliberately corrupt files.\n"
        "Aesthetic scores are a hidden function of exposure, contrast, colourfulness, sharpness,\n"
        "composition (subject distance to the nearest rule-of-thirds point) and noise; see manifest.csv\n"
        "(column hidden_score) and the docstring of cskd_ray/io/demo.py for the formula.\n"
    )
    _atomic_write(out / "AVA.txt", "".join(line + "\n" for line in ava).encode())
    _atomic_write(out / "test.jpgl", "".join(f"{t}\n" for t in test_ids).encode())
    _atomic_write(out / "manifest.csv", _csv_bytes(["uri", "image_id", "labeled", "split", "hidden_score"],
                                                   manifest))
    _atomic_write(out / "labeled.csv", _csv_bytes(["uri"], lab_uris))
    _atomic_write(out / "unlabeled.csv", _csv_bytes(["uri"], unlab_uris))
    _atomic_write(out / "README.txt", readme.encode())
