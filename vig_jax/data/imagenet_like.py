"""A folder of generated JPEGs with ImageNet's size and quality distribution (issue 19).

    python -m vig_jax.data.imagenet_like OUT_DIR --classes 10 --train-per-class 100

writes OUT_DIR/train/<class>/*.JPEG and OUT_DIR/val/<class>/*.JPEG, ready for
`python -m vig_jax.data.prepare --from-folder OUT_DIR --name NAME`. It exists to measure the input
pipeline and the preparation on realistic work, not to learn from: labels are arbitrary.

Sizes: width ~ N(400, 120) clipped to [200, 800], height from an aspect drawn like photos (mostly
4:3 landscape, some portrait and square), so the mean is ~400x360 (ImageNet's train images average
about 400x350 at this range). Content: smooth multi-octave colour noise, a gradient, a few filled
shapes and fine grain, so that JPEG at quality ~90 (85-95) gives ImageNet-like file sizes (~0.5-1
byte per pixel) and the decoder does the same entropy-decoding work as on photos. Every image is a
pure function of (seed, split, index).
"""

import argparse
import concurrent.futures
import io
import multiprocessing
import os
import pathlib
import sys

import numpy as np
import tqdm
from PIL import Image, ImageDraw

GRAIN_STD = 12.0  # per-pixel grey grain: sets the bytes per pixel (entropy-decoding work)
_ASPECTS = ((0.75, 0.6), (1.0, 0.15), (4 / 3, 0.15))  # (height / width, probability); rest random


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) drawn from the ImageNet-like distribution above."""
    width = int(np.clip(rng.normal(400, 120), 200, 800))
    pick = rng.random()
    aspect = None
    for value, probability in _ASPECTS:
        if pick < probability:
            aspect = value
            break
        pick -= probability
    if aspect is None:
        aspect = rng.uniform(0.5, 1.5)
    return int(np.clip(round(width * aspect), 150, 800)), width


def render(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One natural-looking image: uint8 [height, width, 3]."""
    image = np.zeros((height, width, 3), np.float32)
    # Colour noise at three scales (cells of ~64, ~16 and ~4 pixels), bicubically upsampled.
    for cell, amplitude in ((64, 70.0), (16, 30.0), (4, 12.0)):
        small = rng.standard_normal((height // cell + 2, width // cell + 2, 3), np.float32)
        small *= amplitude
        planes = [
            Image.fromarray(small[..., c], "F").resize((width, height), Image.Resampling.BICUBIC)
            for c in range(3)
        ]
        image += np.stack([np.asarray(p) for p in planes], -1)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None]
    image += rng.uniform(60, 190, 3) + ramp * rng.uniform(-80, 80, 3)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        x0, x1 = np.sort(rng.integers(0, width, 2))
        y0, y1 = np.sort(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            draw.polygon(
                [tuple(int(v) for v in p) for p in rng.uniform(0, 1, (3, 2)) * (width, height)],
                fill=colour,
            )
    grain = rng.standard_normal((height, width, 1), dtype=np.float32) * GRAIN_STD
    return np.clip(np.asarray(canvas) + grain, 0, 255).astype(np.uint8)


def jpeg_bytes(seed: int, split: str, index: int) -> bytes:
    """The JPEG of example `index` of `split` (a pure function of the three)."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], index])
    height, width = image_size(rng)
    out = io.BytesIO()
    quality = int(rng.integers(85, 96))
    Image.fromarray(render(rng, height, width)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write_range(out_dir: str, seed: int, split: str, classes: int, start: int, stop: int) -> int:
    total = 0
    for index in range(start, stop):
        path = pathlib.Path(out_dir) / split / f"class_{index % classes:04d}" / f"{index:07d}.JPEG"
        data = jpeg_bytes(seed, split, index)
        path.write_bytes(data)
        total += len(data)
    return total


def generate_folder(
    out_dir: str | os.PathLike,
    *,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
) -> int:
    """Writes OUT_DIR/{train,val}/class_XXXX/NNNNNNN.JPEG; returns the total bytes written.

    Raises:
      ValueError: counts below 1 (val_per_class may be 0).
    """
    if classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise ValueError(f"need classes, train_per_class >= 1: {classes=}, {train_per_class=}")
    num_workers = os.cpu_count() if num_workers is None else num_workers
    jobs = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        count = classes * per_class
        for c in range(classes if count else 0):
            (pathlib.Path(out_dir) / split / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
        step = 64
        jobs += [(split, s, min(s + step, count)) for s in range(0, count, step)]
    args = [(str(out_dir), seed, split, classes, a, b) for split, a, b in jobs]
    bar = tqdm.tqdm(
        total=sum(b - a for _, a, b in jobs),
        unit="img",
        disable=not progress,
        file=sys.stderr,
        desc="generating JPEGs",
    )
    total = 0
    with bar:
        if num_workers == 0:
            for arg in args:
                total += _write_range(*arg)
                bar.update(arg[-1] - arg[-2])
            return total
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            futures = {pool.submit(_write_range, *arg): arg for arg in args}
            for future in concurrent.futures.as_completed(futures):
                total += future.result()
                bar.update(futures[future][-1] - futures[future][-2])
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vig_jax.data.imagenet_like")
    parser.add_argument("out_dir")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    total = generate_folder(
        args.out_dir,
        classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        num_workers=args.workers,
    )
    print(f"wrote {total / 1e6:.1f} MB of JPEGs under {args.out_dir}")
    return 0


if __name__ == "__main__":
    # Through the package module, so worker processes unpickle its classes under their real name.
    from vig_jax.data import imagenet_like

    sys.exit(imagenet_like.main())
