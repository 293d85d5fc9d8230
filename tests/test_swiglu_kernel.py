"""The fused SwiGLU up-projection kernel (pallas_kernels/swiglu.py) against its reference.

CPU: interpret mode, values and the three gradients against float64, ragged M and D (masked rows and
steps along D), bf16 against the float32 reference of the same inputs; a negative control; the
Triton cross-lowering. GPU (`pytest -m gpu`): the compiled kernel at ViG-S 224²'s shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swiglu import TILES, Tiles, swiglu_up, swiglu_up_reference
from tests.helpers import assert_close, rel_err


def _inputs(shape, d, width, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (*shape, d)).astype(dtype)
    w_a, w_b = (jax.random.normal(k, (d, width)) / np.sqrt(d) for k in ks[1:3])
    dh = jax.random.normal(ks[3], (*shape, width)).astype(dtype)
    return x, w_a, w_b, dh


def _fwd_and_grads(f, x, w_a, w_b, dh):
    h, vjp = jax.vjp(f, x, w_a, w_b)
    return (h, *vjp(dh))


def _reference64(x, w_a, w_b, dh):
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, w_a, w_b, dh)]
        return [np.asarray(a) for a in _fwd_and_grads(swiglu_up_reference, *args)]


# M = 150 and 75 rows (not whole row blocks), D = 48 and 100 (not whole steps along D); the
# default tiles and a smaller tiling (other block grid, steps along D).
@pytest.mark.parametrize(
    "shape,d,tiles",
    [((2, 75), 48, TILES), ((75,), 100, TILES), ((75,), 100, Tiles(32, 32, 32, 4, 1))],
    ids=["M150-D48", "M75-D100", "M75-D100-tiles32"],
)
def test_swiglu_up_interpret_matches_float64(shape, d, tiles):
    x, w_a, w_b, dh = _inputs(shape, d, 2 * TILES.block_n, jnp.float32)
    kernel = lambda *a: swiglu_up(*a, impl="pallas", interpret=True, tiles=tiles)
    got = jax.jit(_fwd_and_grads, static_argnums=0)(kernel, x, w_a, w_b, dh)
    want = _reference64(x, w_a, w_b, dh)
    for name, g, w in zip(("h", "dx", "dw_a", "dw_b"), got, want, strict=True):
        assert_close(name, g, w, 1e-5)


def test_swiglu_up_interpret_bf16_and_negative_control():
    """bf16 x: h against the float32 reference of the same bf16 inputs (the kernel rounds once);
    with W_a and W_b swapped (b gated instead of a) the output must not pass."""
    x, w_a, w_b, _ = _inputs((2, 40), 64, TILES.block_n, jnp.bfloat16)
    h = swiglu_up(x, w_a, w_b, impl="pallas", interpret=True)
    assert h.dtype == jnp.bfloat16 and h.shape == (2, 40, TILES.block_n)
    want = swiglu_up_reference(x.astype(jnp.float32), w_a, w_b)
    assert_close("h bf16", h, want, 1e-2)
    swapped = swiglu_up(x, w_b, w_a, impl="pallas", interpret=True)
    assert rel_err(swapped, want) > 0.1


def test_swiglu_up_rejects_bad_input():
    x, w_a, w_b, _ = _inputs((4,), 32, TILES.block_n, jnp.float32)
    with pytest.raises(ValueError, match="w_a, w_b"):
        swiglu_up(x, w_a, w_b[:, :-1], impl="reference")
    with pytest.raises(ValueError, match="multiple of"):
        swiglu_up(x, w_a[:, :-1], w_b[:, :-1], impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="impl="):
        swiglu_up(x, w_a, w_b, impl="cublas")
    with pytest.raises(ValueError, match="5 integers"):
        Tiles.parse("128,64")
    # auto off the GPU: the reference, exactly
    np.testing.assert_array_equal(swiglu_up(x, w_a, w_b), swiglu_up_reference(x, w_a, w_b))


def test_swiglu_up_lowers_to_triton_for_cuda():
    """Forward + backward at ViG-S 224²'s MLP shape cross-lower for CUDA (no GPU needed)."""
    f = lambda x, a, b, dh: _fwd_and_grads(lambda *z: swiglu_up(*z, impl="pallas"), x, a, b, dh)
    shapes = [((128, 196, 384), jnp.bfloat16), ((384, 1024), jnp.float32)]
    shapes += [((384, 1024), jnp.float32), ((128, 196, 1024), jnp.bfloat16)]
    args = [jax.ShapeDtypeStruct(s, t) for s, t in shapes]
    with pytest.MonkeyPatch.context() as mp:  # the GPU check of the entry point, not of lowering
        mp.setattr(jax, "default_backend", lambda: "gpu")
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "swiglu_up" in text


@pytest.mark.gpu
def test_swiglu_up_gpu_matches_reference():
    x, w_a, w_b, dh = _inputs((8, 196), 384, 1024, jnp.bfloat16)
    got = jax.jit(_fwd_and_grads, static_argnums=0)(
        lambda *a: swiglu_up(*a, impl="pallas"), x, w_a, w_b, dh
    )
    up = [a.astype(jnp.float32) for a in (x, w_a, w_b, dh)]
    want = jax.jit(_fwd_and_grads, static_argnums=0)(swiglu_up_reference, *up)
    for name, g, w in zip(("h", "dx", "dw_a", "dw_b"), got, want, strict=True):
        assert_close(name, g, w, 2e-2)
