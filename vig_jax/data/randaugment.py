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
"""

import dataclasses
import functools
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_MAX_LEVEL = 10.0
_OP_PROB = 0.5  # each drawn op is applied with this probability (timm's RandAugment default)
_FILL = (124, 116, 104)  # ImageNet mean in 0-255, as timm fills for the DeiT recipe
_RESAMPLE = Image.Resampling.BICUBIC


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


def _affine(img, coefficients):
    return img.transform(img.size, Image.Transform.AFFINE, coefficients, _RESAMPLE, fillcolor=_FILL)


def _shear_x(img, level, rng):
    return _affine(img, (1, _signed(level / _MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _shear_y(img, level, rng):
    return _affine(img, (1, 0, 0, _signed(level / _MAX_LEVEL * 0.3, rng), 1, 0))


def _translate_x(img, level, rng):
    pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0))


def _translate_y(img, level, rng):
    pixels = _signed(level / _MAX_LEVEL * 0.45, rng) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels))


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
