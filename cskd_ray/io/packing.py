"""Packed training images: each input stored once, small, next to its cached feature.

Training reads every image once per epoch. Reading the originals each time costs one object-store GET per
image per epoch, and decoding a full-size photo to use a 224 px crop of it. The features stage, which reads
and decodes every image anyway, therefore stores a *packed* copy in the cache row (column ``image``):

- an image whose shorter side is at most ``pack_size`` pixels is stored as its original bytes (no loss, no
  re-encoding: the demo's and most thumbnail collections' images);
- a larger one is resized (aspect kept) so that its shorter side is ``pack_size`` and stored as a JPEG of
  quality :data:`PACK_QUALITY`.

The whole image is kept, not a crop, so any :class:`cskd_ray.io.transforms.PreprocessSpec` (``shortest``,
``squash`` or ``longest``) at any training resolution up to ``pack_size`` gets the same region it gets from
the original; only the resampling differs (twice instead of once, and JPEG's loss). A ViT-B/16 student at
224 px needs ``pack_size`` >= 224; the default 256 stores about 15-30 KB per photo.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

PACK_QUALITY = 90


def pack_image(original: bytes, image: Image.Image, pack_size: int) -> bytes:
    """The bytes to store for an image whose file is ``original`` and whose decoded RGB image is ``image``.

    ``image`` must be the full decoded image (decoded at a reduced JPEG scale is fine as long as its shorter
    side is still at least ``pack_size``: :func:`cskd_ray.io.decode.decode_image`'s ``draft_size``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decided at decode
            stored = Image.open(io.BytesIO(original)).size  # the file's own size (header only): ``image`` may be
    except Exception:  # noqa: BLE001 - a draft; it decoded once already: fall back to the decoded size
        stored = image.size
    if min(stored) <= pack_size:
        return original
    width, height = image.size
    scale = pack_size / min(width, height)
    size = (max(pack_size, round(width * scale)), max(pack_size, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    sink = io.BytesIO()
    resized.save(sink, format="JPEG", quality=PACK_QUALITY)
    return sink.getvalue()
