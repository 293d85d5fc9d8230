"""A minimal PNG encoder for the datasets we prepare (8-bit grey or RGB, no filtering).

TFDS needs images as encoded bytes when TensorFlow is absent. Pillow's encoder spends most of its
time in per-call overhead on tiny images (28x28: ~0.15 ms of which the compression is a fraction);
writing the three chunks directly is about 4x faster, which matters for 70k Fashion-MNIST images.
"""

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (0 greyscale, 2 truecolour)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png(image: np.ndarray) -> bytes:
    """Encodes an image losslessly as PNG.

    Args:
      image: [h, w] or [h, w, C] uint8 with C in {1, 3}.
    Returns:
      PNG file bytes (any decoder, e.g. Pillow, gives `image` back).
    Raises:
      ValueError: on another dtype, rank or channel count.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {image.dtype=}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in _COLOUR_TYPES:
        raise ValueError(f"encode_png needs [h, w] or [h, w, 1 or 3], got {image.shape=}")
    h, w, c = image.shape
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOUR_TYPES[c], 0, 0, 0)
    # Each row starts with its filter type byte; 0 = none.
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)
    rows[:, 1:] = image.reshape(h, w * c)
    # Level 1: small images gain little from harder compression, and it is the fastest.
    idat = zlib.compress(rows.tobytes(), 1)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
