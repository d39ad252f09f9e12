"""The demo's final measurements, in the driver (no Ray): every model once on the test split, and forward rates.

The test split is read here and nowhere else in the demo: the stages select their checkpoints on the
validation split. Images are decoded once per preprocessing spec and shared by the models that use it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from cskd_ray.io.decode import decode_image
from cskd_ray.io.labels import TEST_SPLIT, load_labels
from cskd_ray.io.transforms import PreprocessSpec, normalize_batch, resize_crop
from cskd_ray.metrics import evaluate_scores
from cskd_ray.models.saved import load_scoring_model


def _pixels(uris: list[str], spec: PreprocessSpec) -> torch.Tensor:
    """Decoded, resized and normalised images, as every stage prepares them."""
    arrays = [resize_crop(decode_image(Path(uri).read_bytes()).image, spec) for uri in uris]
    return normalize_batch(np.stack(arrays), spec)


def _scores(model: object, pixels: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    scores, dists = [], []
    for i in range(0, len(pixels), batch_size):
        score, dist = model.predict(pixels[i:i + batch_size])
        scores.append(score.numpy())
        dists.append(None if dist is None else dist.numpy())
    return np.concatenate(scores), (None if dists[0] is None else np.concatenate(dists))


def evaluate_on_test(models: Mapping[str, str], ava_path: str, images_root: str, test_list: str,
                     batch_size: int = 64, repeats: int = 4) -> dict[str, dict]:
    """SRCC, PLCC, accuracy (threshold 5) and EMD (r = 1) of each model folder on the test split, plus its rate.

    Args:
        models: Display name → model folder (a teacher or distill ``output/model``).
        ava_path: The AVA.txt label file.
        images_root: Folder of the images.
        test_list: The test list (image ids).
        batch_size: Images per forward pass.
        repeats: Timed passes over the test images per model; the fastest counts.

    Returns:
        Display name → metrics, ``images`` and ``images_per_s``: the model's forward rate over the test images
        (batches of ``batch_size``, CPU threads as configured, decoding excluded; the fastest of ``repeats``
        passes, the first also warms up).
    """
    table = load_labels("ava", ava_path, images_root, test_list=test_list)
    table = table.filter(pc.equal(table.column("split").fill_null(""), TEST_SPLIT))
    uris = table.column("uri").to_pylist()
    target = table.column("score").to_numpy()
    target_dist = np.asarray(table.column("distribution").to_pylist())
    decoded: dict[str, torch.Tensor] = {}
    results = {}
    for name, folder in models.items():
        model = load_scoring_model(folder)
        key = model.preprocess.key()
        if key not in decoded:
            decoded[key] = _pixels(uris, model.preprocess)
        pixels = decoded[key]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pred, dist = _scores(model, pixels, batch_size)
            times.append(time.perf_counter() - start)
        metrics = evaluate_scores(pred, target, 5.0, dist, target_dist if dist is not None else None)
        results[name] = {**metrics, "images": len(uris), "images_per_s": len(uris) / min(times)}
    return results
