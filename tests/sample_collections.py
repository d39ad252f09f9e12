"""Collections in the formats users hold at scale, built in tests: WebDataset tars and Parquet with image bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image_bytes(seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small random image, encoded."""
    rng = np.random.default_rng(seed)
    sink = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sink, format=fmt)
    return sink.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_tar(path: Path, samples: list[tuple[str, str, bytes]], sidecars: bool = True) -> Path:
    """A tar as img2dataset writes it: per sample ``key.ext`` (the image), ``key.json`` and ``key.txt``.

    Args:
        samples: ``(key, extension, image bytes)`` per sample, in tar order.
        sidecars: Also write each sample's ``.json`` (key, url, caption) and ``.txt`` (caption).
    """
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("00000")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for key, ext, data in samples:
            _add(tar, f"{key}{ext}", data)
            if sidecars:
                _add(tar, f"{key}.json", json.dumps({"key": key, "url": f"http://example/{key}",
                                                     "caption": f"photo {key}"}).encode())
                _add(tar, f"{key}.txt", f"photo {key}".encode())
        _add(tar, "00000/stats.cls", b"3")  # not an image, not a sidecar: ignored
    return path


def write_image_parquet(path: Path, images: list[bytes | None], struct: bool = True, row_group_size: int = 4) -> Path:
    """A Parquet file as Hugging Face ``datasets`` stores an ``Image`` feature: ``image {bytes, path}``, ``key``,
    ``caption`` and ``likes`` columns (or a plain binary ``jpg`` column when ``struct`` is False)."""
    keys = [f"hf-{i:03d}" for i in range(len(images))]
    if struct:
        values = [None if b is None else {"bytes": b, "path": f"{k}.jpg"} for k, b in zip(keys, images, strict=True)]
        image = pa.array(values, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "key": keys})
    else:
        table = pa.table({"key": keys, "jpg": pa.array(images, pa.binary())})
    table = table.append_column("caption", pa.array([f"hf photo {i}" for i in range(len(images))]))
    table = table.append_column("likes", pa.array(range(len(images)), pa.int64()))
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
