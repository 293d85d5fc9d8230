"""Bicubic resize of the position-embedding grid, exactly as torch's
`F.interpolate(mode="bicubic", align_corners=False)` (plain ViG: the 14x14 table is
resized at run time for other grids).

`jax.image.resize(method="bicubic")` uses Keys' kernel with a = -0.5 and renormalises weights at the
border; torch uses a = -0.75, half-pixel centres and clamps out-of-range taps to the edge pixel. The
resize is separable: two small interpolation matrices (built in numpy at trace time), two matmuls.
"""

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's upsample_bicubic2d coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t in [0, 1): [n, 4]."""
    A = CUBIC_A

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix M with resized = M @ signal along one axis (as torch).

    Output pixel j samples the source at (j + 0.5) * in/out - 0.5 (no clamping of that coordinate,
    as torch does for cubic); taps outside [0, in_size - 1] read the nearest edge pixel.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size=}, {out_size=}")
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)  # [out, 4]
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)  # [out, 4]
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_pos_embed(table: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Resizes a [h0, w0, D] table to [h, w, D]; returns it unchanged when the sizes already match.

    Args:
      table: [h0, w0, D], any float dtype; the matmuls run in that dtype at highest precision.
      out_hw: (h, w) of the token grid.

    Returns:
      [h, w, D] in the dtype of `table`.
    """
    if table.ndim != 3:
        raise ValueError(f"table must be [h0, w0, D], got {table.shape=}")
    h0, w0, _ = table.shape
    h, w = out_hw
    if (h, w) == (h0, w0):
        return table
    rows = jnp.asarray(bicubic_matrix(h0, h), table.dtype)  # [h, h0]
    cols = jnp.asarray(bicubic_matrix(w0, w), table.dtype)  # [w, w0]
    return jnp.einsum(
        "ai,ijd,bj->abd", rows, table, cols, precision=jax.lax.Precision.HIGHEST
    )  # [h, w, D]
