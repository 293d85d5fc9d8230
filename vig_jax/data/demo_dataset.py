"""`vig_demo_shapes`: a small procedurally generated image classification set, prepared offline.

Ten classes of shapes and textures (circle, ring, square, triangle, cross, star, crescent, stripes,
checkerboard, dots) drawn at a random position, scale and rotation, in random foreground and
background colours with pixel noise. Images are [48, 48, 3] uint8; 5000 train and 1000 validation
examples. Every example is a pure function of (split, index), so preparing twice gives the same
bytes. It exists so that training runs end to end on any machine (CPU included, no network): a small
model gets well above chance (10%) in minutes.

It is written by `vig_jax.data.writer.write_dataset` as a TFDS ArrayRecord dataset and read back
with `builder.as_data_source()` like any other. Images are stored as PNG bytes.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from vig_jax.data import writer
from vig_jax.data.png import encode_png

IMAGE_SIZE = 48
CLASS_NAMES = (
    "circle",
    "ring",
    "square",
    "triangle",
    "cross",
    "star",
    "crescent",
    "stripes",
    "checkerboard",
    "dots",
)
SPLIT_SIZES = {"train": 5000, "validation": 1000}
# Each split draws from its own seed stream, so validation images never repeat training ones.
_SPLIT_SEEDS = {"train": 0, "validation": 1}
_SUPERSAMPLE = 2  # shapes are drawn at 2x resolution and box-filtered: cheap anti-aliasing


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of class `label` in canonical coordinates (u, v), shape unit ~ 1.

    Args:
      label: class index into CLASS_NAMES.
      u, v: [h, w] float coordinates, already rotated and scaled (the shape lives in |u|, |v| <= 1).
      rng: draws the per-example texture frequency.
    Returns:
      [h, w] bool.
    """
    r = np.hypot(u, v)
    inside_square = np.maximum(np.abs(u), np.abs(v)) < 0.9
    name = CLASS_NAMES[label]
    if name == "circle":
        return r < 0.9
    if name == "ring":
        return (r < 0.95) & (r > 0.6)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.7
    if name == "triangle":
        # Equilateral triangle with circumradius 1: inside all three edges, whose outward normals
        # point at 90, 210 and 330 degrees and lie at the inradius 0.5.
        normals = np.deg2rad([90.0, 210.0, 330.0])
        return np.all([np.cos(a) * u + np.sin(a) * v < 0.5 for a in normals], axis=0)
    if name == "cross":
        arm = 0.28
        return ((np.abs(u) < arm) & (np.abs(v) < 0.95)) | ((np.abs(v) < arm) & (np.abs(u) < 0.95))
    if name == "star":
        # Five points: the radius limit peaks every 72 degrees.
        theta = np.arctan2(v, u)
        return r < 0.4 + 0.6 * ((np.cos(5.0 * theta) + 1.0) / 2.0) ** 3
    if name == "crescent":
        return (r < 0.9) & (np.hypot(u - 0.45, v) > 0.7)
    freq = rng.uniform(2.5, 4.0)
    if name == "stripes":
        return inside_square & (np.sin(np.pi * freq * u) > 0)
    if name == "checkerboard":
        cells = np.floor(freq * (u + 1)) + np.floor(freq * (v + 1))
        return inside_square & (cells % 2 == 0)
    if name == "dots":
        cu = np.mod(freq * u, 2.0) - 1.0
        cv = np.mod(freq * v, 2.0) - 1.0
        return inside_square & (np.hypot(cu, cv) < 0.55)
    raise ValueError(f"unknown label {label}")


def _random_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours (float, 0-255) at least 80 grey levels apart."""
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if abs(fg.mean() - bg.mean()) > 80 or np.abs(fg - bg).max() > 140:
            return fg, bg


def render_example(split: str, index: int) -> tuple[np.ndarray, int]:
    """Draws one example deterministically.

    Args:
      split: "train" or "validation".
      index: example index in the split.
    Returns:
      image [48, 48, 3] uint8 and its label (index % 10, so classes are balanced).
    """
    rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
    label = index % len(CLASS_NAMES)
    n = IMAGE_SIZE * _SUPERSAMPLE
    # Pixel centres in [-1, 1], then move, rotate and scale into the shape's frame.
    grid = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(grid, grid, indexing="ij")
    scale = rng.uniform(0.45, 0.8)
    cx, cy = rng.uniform(-(1 - scale), 1 - scale, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (x - cx) + s * (y - cy)) / scale
    v = (-s * (x - cx) + c * (y - cy)) / scale
    mask = _shape_mask(label, u, v, rng).astype(np.float32)
    mask = mask.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))
    fg, bg = _random_colours(rng)
    image = mask[..., None] * fg + (1.0 - mask[..., None]) * bg  # [48, 48, 3]
    image += rng.normal(0.0, rng.uniform(0.0, 20.0), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


NAME, VERSION = "vig_demo_shapes", "1.0.0"


def _example(item: tuple[str, int]) -> tuple[dict, str]:
    image, label = render_example(*item)
    return {"image": encode_png(image), "label": label}, ""


def prepare(data_dir: str | os.PathLike) -> None:
    """Prepares the demo set under `data_dir` unless done; ~6 s of CPU."""
    if writer.is_prepared(data_dir, NAME, VERSION):
        return
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }
    )
    writer.write_dataset(
        name=NAME,
        version=VERSION,
        features=features,
        splits={split: [(split, i) for i in range(n)] for split, n in SPLIT_SIZES.items()},
        make_example=_example,
        data_dir=data_dir,
        num_workers=0,  # ~1 ms an image: worker start-up would cost more than it saves
        description="Procedurally generated shapes and textures for offline demos (vig-jax).",
        progress=False,
    )
