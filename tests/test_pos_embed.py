"""Position-embedding resize against a per-pixel numpy transcription of torch's bicubic upsampling.

torch is not installed here, so `_torch_bicubic` restates aten's upsample_bicubic2d
(align_corners=False) one output pixel at a time: source coordinate (j + 0.5) * in/out - 0.5,
cubic convolution with A = -0.75 on the 4 x 4 neighbourhood, reads clamped to the border. The
golden non-square inputs of test_models check the same path end to end against the real torch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close, rel_err
from vig_jax.models.pos_embed import bicubic_matrix, resize_pos_embed


def _cubic(x, A=-0.75):
    x = abs(x)
    if x <= 1:
        return (A + 2) * x**3 - (A + 3) * x**2 + 1
    if x < 2:
        return A * x**3 - 5 * A * x**2 + 8 * A * x - 4 * A
    return 0.0


def _torch_bicubic(image, out_h, out_w):
    """image: [h0, w0, D] float64 -> [out_h, out_w, D], one output pixel at a time."""
    h0, w0, _ = image.shape
    out = np.zeros((out_h, out_w, image.shape[2]))
    for i in range(out_h):
        y = (i + 0.5) * h0 / out_h - 0.5
        y0 = int(np.floor(y))
        for j in range(out_w):
            x = (j + 0.5) * w0 / out_w - 0.5
            x0 = int(np.floor(x))
            for m in range(-1, 3):
                for n in range(-1, 3):
                    weight = _cubic(y - (y0 + m)) * _cubic(x - (x0 + n))
                    out[i, j] += (
                        weight * image[min(max(y0 + m, 0), h0 - 1), min(max(x0 + n, 0), w0 - 1)]
                    )
    return out


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((14, 14), (10, 16)),
        ((14, 14), (12, 20)),
        ((14, 14), (32, 7)),
        ((3, 5), (8, 2)),
        ((1, 4), (3, 9)),
    ],
    ids=lambda hw: "x".join(map(str, hw)),
)
def test_resize_matches_torch_formula(in_hw, out_hw, x64):
    table = np.random.default_rng(0).normal(size=(*in_hw, 3))
    got = resize_pos_embed(jnp.asarray(table), out_hw)
    assert got.dtype == jnp.float64
    assert_close(f"{in_hw}->{out_hw}", got, _torch_bicubic(table, *out_hw), 1e-12)


def test_resize_same_size_is_identity():
    table = jnp.arange(14 * 14 * 2, dtype=jnp.float32).reshape(14, 14, 2)
    assert resize_pos_embed(table, (14, 14)) is table


def test_resize_differs_from_jax_image_resize():
    """Negative control: jax.image.resize's bicubic (Keys a=-0.5) is not torch's."""
    table = jax.random.normal(jax.random.key(0), (14, 14, 4))
    ours = resize_pos_embed(table, (10, 16))
    theirs = jax.image.resize(table, (10, 16, 4), method="bicubic")
    assert rel_err(ours, theirs) > 1e-2


def test_matrix_rows_sum_to_one_and_bad_sizes_raise():
    for n_in, n_out in [(14, 10), (14, 33), (2, 5)]:
        np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        bicubic_matrix(0, 3)
    with pytest.raises(ValueError, match=r"\[h0, w0, D\]"):
        resize_pos_embed(jnp.zeros((196, 8)), (10, 10))
