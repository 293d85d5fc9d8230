"""Host-side per-example transforms (numpy/PIL), spec "Training recipe".

Train (`TrainTransform`, chosen by `augment["kind"]`):
- "deit": random-resized-crop (area `scale`, log-uniform aspect `ratio`, bicubic), horizontal
  flip, RandAugment (timm string, e.g. "rand-m9-mstd0.5-inc1", or None/"" for none).
- "pad_crop": resize to the image size if needed, zero-pad `padding` pixels, random crop, flip.
- "none": the eval transform with crop_pct 1.
Eval (`EvalTransform`): resize the shorter side to floor(size / crop_pct) (bicubic), centre crop.
Every transform returns {"image": uint8 [S, S, 3], "label": int32}; grey images become RGB.
Normalisation, random erasing and mixup/cutmix run on the device (`mix.py`).

Images arrive either decoded (uint8 arrays) or as their encoded bytes (what the pipeline reads,
issue 19). From bytes, a JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8: Pillow's `draft`)
whenever the region to resize still has at least the output's size at that scale, so nothing
below the output resolution is lost; the training crop and the eval window are resized straight
from the decoded image, which is the full resize followed by the crop without computing the pixels
the crop drops. Random draws are the same, in the same order, for arrays and bytes.
"""

import dataclasses
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from vig_jax.data.randaugment import RandAugment

_RESAMPLE = Image.Resampling.BICUBIC  # DeiT's interpolation for crops and eval resizes
_AUGMENT_KEYS = {
    "deit": {"kind", "scale", "ratio", "hflip", "randaugment"},
    "pad_crop": {"kind", "padding", "hflip"},
    "none": {"kind"},
}
_RRC_ATTEMPTS = 10  # tries to draw a box that fits before falling back to a centre crop
_DRAFT_SCALES = (8, 4, 2)  # JPEG DCT scales Pillow's draft offers (1/8, 1/4, 1/2)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """[h, w], [h, w, 1] or [h, w, 3] uint8 -> [h, w, 3] (grey repeated)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [h, w], [h, w, 1] or [h, w, 3], got {image.shape=}")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def open_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> a PIL image whose header is read; pixels decode on first use."""
    return Image.open(io.BytesIO(data))


def decode_region(
    image: Image.Image, box: tuple[float, float, float, float], out_size: tuple[int, int]
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decodes `image` (opened, not loaded) as RGB at the coarsest JPEG DCT scale that keeps
    `box` at least `out_size` (width, height) pixels.

    Args:
      image: from `open_image`.
      box: (left, top, right, bottom) of the region to resize, in full-resolution pixels.
      out_size: (width, height) the region will be resized to.
    Returns:
      (RGB image, `box` in its pixels).
    """
    width, height = image.size
    left, top, right, bottom = box
    if image.format == "JPEG":
        for scale in _DRAFT_SCALES:
            if right - left >= scale * out_size[0] and bottom - top >= scale * out_size[1]:
                # Asking for (w // s, h // s) makes Pillow pick exactly scale s; libjpeg then
                # decodes ceil(w / s) x ceil(h / s) pixels.
                image.draft("RGB", (width // scale, height // scale))
                break
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, CMYK, palette, RGBA
    sx, sy = width / image.width, height / image.height
    return image, (left / sx, top / sy, right / sx, bottom / sy)


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [h, w, 3] at full resolution."""
    image = open_image(data)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    # The longer side is truncated, as torchvision's Resize(int) does.
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def _eval_window(
    height: int, width: int, size: int, crop_pct: float
) -> tuple[tuple[int, int], tuple[int, int], tuple[float, float, float, float]]:
    """Where the eval resize + centre crop takes its pixels from.

    Returns:
      ((new_w, new_h), (left, top), box): the shorter side resized to floor(size / crop_pct) gives
      new_w x new_h; the crop starts at (left, top) in it; `box` is that crop in source pixels.
    """
    new_h, new_w = _short_side_size(height, width, math.floor(size / crop_pct))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (new_w, new_h), (left, top), (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def _resize_window(
    image: Image.Image, box: tuple[float, float, float, float], size: int
) -> Image.Image:
    """The bicubic resize of the whole image, cropped to `box` (source pixels, at least `size`
    wide and high), computed for the box only: size x size.

    Pillow resizes in two passes, horizontal then vertical, rounding to uint8 in between. Doing the
    same passes as two calls, the first on just the rows the second reads, gives the full resize's
    pixels to within one grey level (float weights). One call with the box skips the same work but
    differed from the full resize by up to 13 levels near strong edges (Pillow 13).
    """
    left, top, right, bottom = box
    support = 2.0 * max((bottom - top) / size, 1.0)  # bicubic: 2 output pixels, in source rows
    first = max(int(top - support) - 1, 0)
    last = min(math.ceil(bottom + support) + 1, image.height)
    rows = image.crop((0, first, image.width, last))
    rows = rows.resize((size, last - first), _RESAMPLE, box=(left, 0, right, last - first))
    return rows.resize((size, size), _RESAMPLE, box=(0, top - first, size, bottom - first))


def _resize_and_centre_crop(image: Image.Image, size: int, crop_pct: float) -> np.ndarray:
    """`resize_and_centre_crop` of a PIL image, opened from bytes (decoded here, at a reduced JPEG
    scale when the crop allows) or in memory (RGB)."""
    width, height = image.size
    new_size, (left, top), box = _eval_window(height, width, size, crop_pct)
    if new_size[0] < width and new_size[1] < height:  # shrinks: resize only the crop
        image, box = decode_region(image, box, (size, size))
        return np.asarray(_resize_window(image, box, size))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if new_size != (width, height):  # enlarges: the whole image, then the crop
        image = image.resize(new_size, _RESAMPLE)
    return np.asarray(image)[top : top + size, left : left + size]


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Draws a crop box: area fraction ~ U(scale), aspect w/h log-uniform in `ratio`.

    After 10 misses (box larger than the image) falls back to the largest centre crop whose
    aspect lies in `ratio`, as torchvision/timm do.
    Returns:
      (top, left, crop_height, crop_width), a box inside the image.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    aspect = width / height
    if aspect < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_and_centre_crop(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
    """Resizes the shorter side to floor(size / crop_pct) (bicubic), then centre-crops size x size.

    When the resize shrinks, only the crop is computed (`_resize_window`).
    Args:
      image: [h, w, 3] uint8.
    Returns:
      [size, size, 3] uint8.
    """
    return _resize_and_centre_crop(Image.fromarray(image), size, crop_pct)


def pad_and_random_crop(rng: np.random.Generator, image: np.ndarray, padding: int) -> np.ndarray:
    """Zero-pads `padding` pixels on each side, then crops the original size at a random offset."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top : top + height, left : left + width]


def _check_pair(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not low < pair[0] <= pair[1] <= high:
        raise ValueError(f"augment[{name!r}] must be (a, b) with {low} < a <= b <= {high}: {value}")
    return pair


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Random training transform of one example; pickles for grain's worker processes.

    Build it with `TrainTransform.from_config(augment, image_size)`.
    """

    kind: str
    image_size: int
    hflip: bool = False
    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    randaugment: RandAugment | None = None
    padding: int = 0

    @classmethod
    def from_config(cls, augment: Mapping[str, Any], image_size: int) -> "TrainTransform":
        """Validates a dict/ConfigDict of augmentation options (see the module docstring).

        Raises:
          ValueError: unknown kind, unknown or missing keys for the kind, values out of range.
        """
        augment = dict(augment)
        kind = augment.get("kind")
        if kind not in _AUGMENT_KEYS:
            raise ValueError(f"augment kind must be one of {sorted(_AUGMENT_KEYS)}, got {kind!r}")
        unknown, missing = set(augment) - _AUGMENT_KEYS[kind], _AUGMENT_KEYS[kind] - set(augment)
        if unknown or missing:
            raise ValueError(
                f"augment kind {kind!r} takes exactly {sorted(_AUGMENT_KEYS[kind])}; "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
            )
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        options = {"kind": kind, "image_size": image_size}
        if "hflip" in augment:
            if not isinstance(augment["hflip"], bool):
                raise ValueError(f"augment['hflip'] must be a bool, got {augment['hflip']!r}")
            options["hflip"] = augment["hflip"]
        if kind == "deit":
            options["scale"] = _check_pair("scale", augment["scale"], 0.0, 1.0)
            options["ratio"] = _check_pair("ratio", augment["ratio"], 0.0, math.inf)
            if augment["randaugment"]:
                options["randaugment"] = RandAugment.from_string(augment["randaugment"])
        if kind == "pad_crop":
            padding = augment["padding"]
            if not isinstance(padding, int) or padding < 0:
                raise ValueError(f"augment['padding'] must be an int >= 0, got {padding!r}")
            options["padding"] = padding
        return cls(**options)

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """{"image": uint8 [h, w, C] or encoded bytes, "label": int} ->
        {"image": uint8 [S, S, 3], "label": int32}."""
        image = example["image"]
        encoded = isinstance(image, bytes)
        size = self.image_size
        if self.kind == "deit":
            pil = open_image(image) if encoded else Image.fromarray(to_rgb(np.asarray(image)))
            top, left, crop_h, crop_w = random_resized_crop_box(
                rng, pil.height, pil.width, self.scale, self.ratio
            )
            pil, box = decode_region(pil, (left, top, left + crop_w, top + crop_h), (size, size))
            pil = pil.resize((size, size), _RESAMPLE, box=box)
            if self.hflip and rng.random() < 0.5:
                pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.randaugment is not None:
                pil = self.randaugment(pil, rng)
            image = np.asarray(pil)
        else:
            pil = open_image(image) if encoded else Image.fromarray(to_rgb(np.asarray(image)))
            image = _resize_and_centre_crop(pil, size, crop_pct=1.0)
            if self.kind == "pad_crop":
                image = pad_and_random_crop(rng, image, self.padding)
                if self.hflip and rng.random() < 0.5:
                    image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Deterministic eval transform: shorter side to floor(S / crop_pct), centre crop S."""

    image_size: int
    crop_pct: float

    def __post_init__(self):
        if self.image_size <= 0 or not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(
                f"need image_size > 0 and 0 < crop_pct <= 1, got {self.image_size=}, "
                f"{self.crop_pct=}"
            )

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """{"image": uint8 [h, w, C] or encoded bytes, "label": int} ->
        {"image": uint8 [S, S, 3], "label": int32}."""
        image = example["image"]
        if isinstance(image, bytes):
            pil = open_image(image)
        else:
            pil = Image.fromarray(to_rgb(np.asarray(image)))
        image = _resize_and_centre_crop(pil, self.image_size, self.crop_pct)
        return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}
