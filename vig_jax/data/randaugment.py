"""RandAugment as in timm's `rand-m9-mstd0.5-inc1` (training recipe), on PIL images.

Semantics (timm's RandAugment with the "increasing" op set), written from its description:
- `n` ops (default 2) are drawn uniformly, with replacement, from 15 ops; each is applied with
  probability 0.5.
- Each application draws its magnitude from N(m, mstd) (m = 9, mstd = 0.5), clipped to [0, 10].
- Magnitude maps to a strength that grows with it for every op ("increasing"): rotate up to 30
  degrees, shear up to 0.3, translate up to 45% of the size, enhance factors 1 +- 0.9, posterize
  down to 0 kept bits, solarize threshold down to 0, solarize-add up to +110. Signed ops get a
  random sign.
- Geometric ops fill with the ImageNet mean colour and resample bicubically (DeiT's interpolation).

Rotate and the enhance/LUT ops are Pillow's. Shear and translate move the source along one axis
only, so Pillow's bicubic transform (a = -1 cubic, edge pixels repeated, fill where the source
position leaves the image) reduces to four taps per line with one weight set per line:
`shift_lines` (shear) and `translate` (one weight set for the whole image, computed only where the
source stays inside) do that in numpy, 2.5x and 3x faster than Pillow's per-pixel transform, and
equal to it to within one grey level (float32 weights; Pillow truncates a float64 sum).
`pillow_shift` is Pillow's own form, the reference the tests compare against.
"""

import dataclasses
import functools
import math
import re

import numpy as np
from numpy.lib.stride_tricks import as_strided
from PIL import Image, ImageEnhance, ImageOps

_MAX_LEVEL = 10.0
_OP_PROB = 0.5  # each drawn op is applied with this probability (timm's RandAugment default)
_FILL = (124, 116, 104)  # ImageNet mean in 0-255, as timm fills for the DeiT recipe
_RESAMPLE = Image.Resampling.BICUBIC
_FILL_VALUES = np.array(_FILL, np.float32)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _auto_contrast(img, level, rng):
    return ImageOps.autocontrast(img)


def _equalize(img, level, rng):
    return ImageOps.equalize(img)


def _invert(img, level, rng):
    return ImageOps.invert(img)


def _rotate(img, level, rng):
    return img.rotate(_signed(level / _MAX_LEVEL * 30.0, rng), resample=_RESAMPLE, fillcolor=_FILL)


def shift_lines(image: np.ndarray, slope: float, offset: float) -> np.ndarray:
    """Pillow's bicubic affine transform (1, slope, offset, 0, 1, 0) of an RGB image, in numpy.

    Output pixel (y, x) samples row y at x' = (x + 0.5) + slope * (y + 0.5) + offset (Pillow's
    pixel-centre convention), with Pillow's a = -1 cubic on the 4 pixels around x' - 0.5 (edge
    pixels repeated) and the fill colour where x' is outside [0, width).
    Args:
      image: uint8 [h, w, 3].
    Returns:
      uint8 [h, w, 3], equal to Pillow's to within one grey level.
    """
    height, width, channels = image.shape
    line_shift = (np.arange(height) + 0.5) * slope
    start = (0.5 + line_shift + offset) - 0.5  # x' - 0.5 at x = 0; x adds an integer
    first = np.floor(start)
    d = (start - first).astype(np.float32)[:, None, None]
    first = first.astype(np.intp)
    # Each line reads width + 3 pixels from its own start: pad so that every start is in range.
    # Only the 2 pixels next to the image are read by an output inside it (edge copies); the rest
    # is read only by outputs that get the fill colour.
    pad = int(np.abs(first).max()) + 3
    padded = np.zeros((height, width + 2 * pad, channels), np.uint8)
    padded[:, pad : pad + width] = image
    padded[:, pad - 2 : pad] = image[:, :1]
    padded[:, pad + width : pad + width + 2] = image[:, -1:]
    s_line, s_pixel, s_channel = padded.strides
    windows = as_strided(
        padded,
        (height, 2 * pad + 1, width + 3, channels),
        (s_line, s_pixel, s_pixel, s_channel),
        writeable=False,
    )
    # One gather of each line's width + 3 source pixels; the 4 taps are slices of it.
    taps = windows[np.arange(height), first + pad - 1].astype(np.float32)
    d2 = d * d
    # Pillow's p1 + d (p2 + d (p3 + d p4)) written as weights of the 4 taps.
    weights = (d2 * (2.0 - d) - d, 1.0 + d2 * (d - 2.0), d + d2 * (1.0 - d), d2 * (d - 1.0))
    out = taps[:, 0:width] * weights[0]
    for k in (1, 2, 3):
        out += taps[:, k : k + width] * weights[k]
    np.clip(out, 0.0, 255.0, out=out)
    source = ((np.arange(width) + 0.5)[None, :] + line_shift[:, None]) + offset
    outside = (source < 0.0) | (source >= width)
    if outside.any():
        np.copyto(
            out.reshape(height, -1),
            np.tile(_FILL_VALUES, width),
            where=np.repeat(outside, channels, axis=1),
        )
    return out.astype(np.uint8)  # truncates, as Pillow does


def translate(image: np.ndarray, offset: float, axis: int) -> np.ndarray:
    """`shift_lines` with slope 0 along `axis` (1: x, 0: y): one weight set for the whole image, so
    slices instead of gathers, computed only where the source stays inside the image."""
    size = image.shape[axis]
    source = (np.arange(size) + 0.5) + offset  # Pillow's source position of each output pixel
    inside = np.flatnonzero((source >= 0.0) & (source < size))
    out = np.empty_like(image)
    lines = [slice(None)] * 2
    if inside.size == 0:
        out[...] = _FILL
        return out
    low, high = int(inside[0]), int(inside[-1]) + 1
    start = (0.5 + offset) - 0.5
    first = math.floor(start)
    d = np.float32(start - first)
    # Edge pixels repeated twice on both sides: the taps of an inside output stay within.
    pad = [(0, 0)] * 3
    pad[axis] = (2, 2)
    padded = np.pad(image, pad, mode="edge")
    d2 = d * d
    weights = (d2 * (2.0 - d) - d, 1.0 + d2 * (d - 2.0), d + d2 * (1.0 - d), d2 * (d - 1.0))
    total = None
    for k, weight in enumerate(weights):
        # Output x reads source x + first - 1 + k, at x + first + 1 + k in the padded image.
        lines[axis] = slice(low + first + 1 + k, high + first + 1 + k)
        tap = padded[tuple(lines)] * np.float32(weight)
        total = tap if total is None else np.add(total, tap, out=total)
    np.clip(total, 0.0, 255.0, out=total)
    lines[axis] = slice(low, high)
    out[tuple(lines)] = total  # truncates, as Pillow does
    lines[axis] = slice(0, low)
    out[tuple(lines)] = _FILL
    lines[axis] = slice(high, size)
    out[tuple(lines)] = _FILL
    return out


def pillow_shift(img: Image.Image, slope: float, offset: float, vertical: bool) -> Image.Image:
    """The reference for `shift_lines`: Pillow's transform (1, slope, offset, 0, 1, 0), or on y."""
    coefficients = (1, 0, 0, slope, 1, offset) if vertical else (1, slope, offset, 0, 1, 0)
    return img.transform(img.size, Image.Transform.AFFINE, coefficients, _RESAMPLE, fillcolor=_FILL)


def _shift(img: Image.Image, slope: float, offset: float, vertical: bool) -> Image.Image:
    """Shear/translate along x, or along y (shear: the same on the transposed image)."""
    if slope == 0.0:
        return Image.fromarray(translate(np.asarray(img), offset, axis=0 if vertical else 1))
    if vertical:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    out = Image.fromarray(shift_lines(np.asarray(img), slope, offset))
    return out.transpose(Image.Transpose.TRANSPOSE) if vertical else out


def _shear_x(img, level, rng):
    return _shift(img, _signed(level / _MAX_LEVEL * 0.3, rng), 0.0, vertical=False)


def _shear_y(img, level, rng):
    return _shift(img, _signed(level / _MAX_LEVEL * 0.3, rng), 0.0, vertical=True)


def _translate_x(img, level, rng):
    pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[0]
    return _shift(img, 0.0, pixels, vertical=False)


def _translate_y(img, level, rng):
    pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[1]
    return _shift(img, 0.0, pixels, vertical=True)


@functools.cache
def _lut(kind: str, amount: int, bands: int) -> tuple[int, ...]:
    """A Pillow `point` table for every band: posterize to `amount` bits, or add `amount` to
    values below 128 (saturating). Built once per (kind, amount, bands): the levels are integers."""
    if kind == "posterize":
        # Pillow's ImageOps.posterize refuses 0 bits (all black), which level 10 asks for.
        mask = (0xFF << (8 - amount)) & 0xFF
        table = [v & mask for v in range(256)]
    else:
        table = [min(255, v + amount) if v < 128 else v for v in range(256)]
    return tuple(table * bands)


def _posterize(img, level, rng):
    bits = 4 - int(level / _MAX_LEVEL * 4)  # keeps 4 bits at level 0 down to 0 bits at level 10
    return img.point(_lut("posterize", bits, len(img.getbands())))


def _solarize(img, level, rng):
    return ImageOps.solarize(img, 256 - int(level / _MAX_LEVEL * 256))


def _solarize_add(img, level, rng):
    # Adds to pixels below 128 only (saturating), leaves the rest.
    add = int(level / _MAX_LEVEL * 110)
    return img.point(_lut("solarize_add", add, len(img.getbands())))


def _enhancer(kind):
    def op(img, level, rng):
        return kind(img).enhance(1.0 + _signed(level / _MAX_LEVEL * 0.9, rng))

    op.__name__ = f"_{kind.__name__.lower()}"
    return op


OPS = (
    _auto_contrast,
    _equalize,
    _invert,
    _rotate,
    _posterize,
    _solarize,
    _solarize_add,
    _enhancer(ImageEnhance.Color),
    _enhancer(ImageEnhance.Contrast),
    _enhancer(ImageEnhance.Brightness),
    _enhancer(ImageEnhance.Sharpness),
    _shear_x,
    _shear_y,
    _translate_x,
    _translate_y,
)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """`num_ops` random ops per image, each applied with probability 0.5, level ~ N(m, mstd)."""

    magnitude: float
    magnitude_std: float
    num_ops: int

    @classmethod
    def from_string(cls, spec: str) -> "RandAugment":
        """Parses timm's string form, e.g. "rand-m9-mstd0.5-inc1" (also "-n2").

        Raises:
          ValueError: not of the form rand-m<M>[-n<N>][-mstd<S>]-inc1, or an unknown field.
        """
        parts = spec.split("-")
        if parts[0] != "rand" or len(parts) < 2:
            raise ValueError(f"RandAugment spec must look like 'rand-m9-mstd0.5-inc1': {spec!r}")
        fields = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|m|n|inc)([0-9.]+)", part)
            if match is None or match.group(1) in fields:
                raise ValueError(f"bad or repeated field {part!r} in RandAugment spec {spec!r}")
            fields[match.group(1)] = float(match.group(2))
        if "m" not in fields or fields.get("inc") != 1:
            # Only the "increasing" op set (inc1) is implemented: it is what the recipe uses.
            raise ValueError(f"RandAugment spec needs m<M> and inc1, got {spec!r}")
        return cls(
            magnitude=fields["m"],
            magnitude_std=fields.get("mstd", 0.0),
            num_ops=int(fields.get("n", 2)),
        )

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Applies the random ops to an RGB PIL image; same size and mode out."""
        for index in rng.integers(0, len(OPS), size=self.num_ops):
            if rng.random() >= _OP_PROB:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = rng.normal(self.magnitude, self.magnitude_std)
            img = OPS[index](img, float(np.clip(level, 0.0, _MAX_LEVEL)), rng)
        return img
