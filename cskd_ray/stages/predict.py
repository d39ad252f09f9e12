"""Scoring images in plain Python, without Ray: ``cskd_ray.load(model).score(images)``.

A :class:`Predictor` holds one scoring model (a teacher / distill ``output/model`` folder or an export
folder, loaded by :func:`cskd_ray.models.saved.load_scoring_model`) on CUDA when there is one, else on the
CPU. Images go through the same steps as in the ``score`` stage
(:func:`cskd_ray.io.read_tasks.read_decode_batch` and :class:`cskd_ray.stages.label.ScoreActor`, without Ray's
dedup): bytes are read with :mod:`cskd_ray.io.storage`, decoded by
:func:`~cskd_ray.io.decode.decode_image` (EXIF orientation, any mode to RGB, JPEG draft at the input
size), resized and cropped by :func:`~cskd_ray.io.transforms.resize_crop`, normalised on the model's
device and scored in batches, so a file gets the score ``cskd-ray score`` writes for it.

In-memory inputs skip the read and decode steps: a PIL image is EXIF-transposed and converted to RGB, a
numpy array (H, W, 3) ``uint8`` (or (H, W) grayscale, (H, W, 4) RGBA) is taken as RGB pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image, ImageOps

from cskd_ray.config import ConfigError
from cskd_ray.io import storage
from cskd_ray.io.decode import DEFAULT_MAX_PIXELS, decode_image, to_rgb
from cskd_ray.io.transforms import normalize_batch, resize_crop
from cskd_ray.models.saved import load_scoring_model

ImageInput = str | os.PathLike | Image.Image | np.ndarray
DEFAULT_BATCH_SIZE = 32


class ImageInputError(ValueError):
    """An input cannot be scored (unreadable, not an image, wrong array shape); the message names it."""


@dataclass(frozen=True)
class Prediction:
    """One input's result: ``score`` and ``distribution`` (None for scalar heads), or ``error``."""

    source: str
    score: float | None
    distribution: list[float] | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Whether the input was scored."""
        return self.error is None


def describe_input(image: Any) -> str:
    """A short name of an input for messages: the path, or the kind and size of an in-memory image."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.width}x{image.height}>"
    if isinstance(image, np.ndarray):
        return f"<array {image.dtype} {'x'.join(map(str, image.shape))}>"
    return f"<{type(image).__name__}>"


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(f"{describe_input(array)}: expected a uint8 array of shape (H, W, 3), (H, W, 4) "
                              "or (H, W); pass a batch as a list of images")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


class Predictor:
    """A loaded scoring model that scores paths, URIs, PIL images and numpy arrays (see the module doc).

    Args:
        model: A model folder written by teacher / distill, or an export folder (local path or s3://), or a
            model pushed to the Hugging Face Hub, ``hf-hub:org/name[@revision]`` (:mod:`cskd_ray.models.hub`).
        device: ``cuda``, ``cpu``, ...; default CUDA when available, else CPU.
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU, as ``cskd-ray score``), ``fp32``, ``fp16``, ``bf16``.
        batch_size: Images per forward pass.
        max_pixels: Larger images are refused before decoding (decompression bombs).

    Raises:
        WeightsUnavailableError: If ``model`` is not a model or export folder, or a Hub model cannot be fetched
            (:class:`cskd_ray.models.hub.HubError`: offline and not cached, no such repository).
        ValueError: If ``batch_size`` < 1.
    """

    def __init__(self, model: str | os.PathLike, device: str | torch.device | None = None, precision: str = "auto",
                 batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.scorer = load_scoring_model(os.fspath(model)).to(self.device)
        self.precision, self.batch_size, self.max_pixels = precision, batch_size, max_pixels

    @property
    def head(self) -> dict:
        """The head spec: ``kind`` (distribution or scalar), ``bins``, ``low``, ``high``, ``threshold``."""
        return self.scorer.head

    @property
    def model_id(self) -> str:
        """The model id written in score tables (see :func:`cskd_ray.models.saved.scoring_model_id`)."""
        return self.scorer.model_id

    def pixels(self, image: ImageInput) -> np.ndarray:
        """The model-input pixels (S, S, 3) uint8 of one input, exactly as the score stage makes them.

        Raises:
            ImageInputError: If the input cannot be read or decoded.
        """
        spec = self.scorer.preprocess
        if isinstance(image, (str, os.PathLike)):
            uri = os.fspath(image)
            try:
                data = storage.read_bytes(uri)
            except (OSError, ValueError) as exc:
                raise ImageInputError(f"read error: {exc}") from exc
            decoded = decode_image(data, self.max_pixels, draft_size=spec.image_size)
            if not decoded.ok:
                raise ImageInputError(decoded.error)
            return resize_crop(decoded.image, spec)
        if isinstance(image, Image.Image):
            return resize_crop(to_rgb(ImageOps.exif_transpose(image) or image), spec)
        if isinstance(image, np.ndarray):
            return resize_crop(_array_to_rgb(image), spec)
        raise ImageInputError(f"{describe_input(image)}: expected a path or URI, a PIL image or a numpy array")

    def predict_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (N,) and distributions (N, K) or None of an (N, S, S, 3) uint8 batch (:meth:`pixels`)."""
        scores, dists = [], []
        for start in range(0, len(pixels), self.batch_size):
            x = normalize_batch(pixels[start:start + self.batch_size], self.scorer.preprocess, self.device)
            batch_scores, batch_dists = self.scorer.predict(x, self.precision)
            scores.append(batch_scores.cpu().numpy().astype(np.float64))
            if batch_dists is not None:
                dists.append(batch_dists.cpu().numpy())
        return np.concatenate(scores), (np.concatenate(dists) if dists else None)

    def predict_many(self, images: Iterable[ImageInput]) -> list[Prediction]:
        """Score each input; a bad input gets a :class:`Prediction` with ``error`` set and never raises."""
        images = list(images)
        results: list[Prediction | None] = [None] * len(images)
        for start in range(0, len(images), self.batch_size):
            ok, arrays = [], []
            for i in range(start, min(start + self.batch_size, len(images))):
                try:
                    arrays.append(self.pixels(images[i]))
                    ok.append(i)
                except ImageInputError as exc:
                    results[i] = Prediction(describe_input(images[i]), None, None, str(exc))
            if ok:
                scores, dists = self.predict_pixels(np.stack(arrays))
                for j, i in enumerate(ok):
                    dist = dists[j].tolist() if dists is not None else None
                    results[i] = Prediction(describe_input(images[i]), float(scores[j]), dist, None)
        return results  # type: ignore[return-value] - every slot is filled above

    def _checked(self, x: ImageInput | Sequence[ImageInput]) -> tuple[list[Prediction], bool]:
        single = not isinstance(x, (list, tuple))
        predictions = self.predict_many([x] if single else x)
        for p in predictions:
            if not p.ok:
                raise ImageInputError(p.error if p.source in p.error else f"{p.source}: {p.error}")
        return predictions, single

    def score(self, x: ImageInput | Sequence[ImageInput]) -> float | list[float]:
        """The score on the dataset's scale (Σ_k k·p_k for K-bin heads) of one input, or a list for a list.

        Raises:
            ImageInputError: If an input cannot be read or decoded (use :meth:`predict_many` to get
                per-input errors instead).
        """
        predictions, single = self._checked(x)
        scores = [p.score for p in predictions]
        return scores[0] if single else scores

    def predict_distribution(self, x: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """The score distribution: shape (K,) for one input, (N, K) for a list (probabilities over 1..K).

        Raises:
            ValueError: If the model has a scalar head (it predicts a score, not a distribution).
            ImageInputError: If an input cannot be read or decoded.
        """
        if self.head["kind"] != "distribution":
            raise ValueError(f"model {self.model_id} has a scalar head: it predicts no distribution; use score()")
        predictions, single = self._checked(x)
        dists = np.asarray([p.distribution for p in predictions], dtype=np.float32).reshape(len(predictions), -1)
        return dists[0] if single else dists


def load(model: str | os.PathLike, device: str | torch.device | None = None, precision: str = "auto",
         batch_size: int = DEFAULT_BATCH_SIZE) -> Predictor:
    """Load a scoring model for use in Python (no Ray); see :class:`Predictor`.

    Example::

        model = cskd_ray.load("runs/demo/student/model")   # or "hf-hub:org/name"
        model.score("photo.jpg")                # 5.73
        model.score([pil_image, numpy_image])   # [4.91, 6.02]
    """
    return Predictor(model, device, precision, batch_size)


def expand_image_args(args: Sequence[str], stdin: TextIO) -> tuple[list[str], list[tuple[str, str]]]:
    """The images named on a command line, and ``(argument, error)`` for arguments that name none.

    A folder, S3 prefix or glob (``*?[``) is listed with :func:`cskd_ray.io.storage.list_files`; ``-`` reads one
    path or URI a line from ``stdin``; anything else is taken as one image (a missing file fails when read).
    """
    images: list[str] = []
    errors: list[tuple[str, str]] = []
    for arg in args:
        if arg == "-":
            images += [line.strip() for line in stdin if line.strip()]
            continue
        try:
            if any(c in arg for c in storage.GLOB_CHARS) or storage.is_dir(arg):
                found = [entry.uri for entry in storage.list_files(arg)]
                images += found
                if not found:
                    errors.append((arg, "no files match"))
                continue
        except storage.StorageError as exc:
            errors.append((arg, str(exc)))
            continue
        images.append(arg)
    return images, errors


def run_predict_command(model: str, args: Sequence[str], as_json: bool, stdin: TextIO, out: TextIO, err: TextIO,
                        batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None) -> int:
    """``cskd-ray predict``: load the model once, print ``path<TAB>score`` (or a JSON line) per image.

    Unreadable or undecodable images get a ``path<TAB>error: ...`` line on ``err``. Returns the exit status:
    0 when every image was scored, 1 when any failed. A bad model folder raises (the CLI exits 2).
    """
    predictor = Predictor(model, device, batch_size=batch_size)
    images, errors = expand_image_args(args, stdin)
    if not images and not errors:
        raise ConfigError("no images given (stdin was empty)")
    for arg, message in errors:
        print(f"{arg}\terror: {message}", file=err, flush=True)
    failed = len(errors)
    for start in range(0, len(images), predictor.batch_size):
        for p in predictor.predict_many(images[start:start + predictor.batch_size]):
            if not p.ok:
                failed += 1
                print(f"{p.source}\terror: {p.error}", file=err, flush=True)
            elif as_json:
                print(json.dumps({"path": p.source, "score": p.score, "distribution": p.distribution}), file=out)
            else:
                print(f"{p.source}\t{p.score:.6f}", file=out)
        out.flush()
    return 1 if failed else 0
