"""pallas_kernels/swiglu_mosaic.py: SwiGLU's up projection and gate as one Mosaic GPU kernel.

CPU: the kernel cross-lowers for CUDA at ViG widths and ragged row counts; its blocking with the
interleaved weights (`swiglu_up_emulated`) equals the XLA form, and a wrong interleave fails; the
model form keeps the parameters and, where it applies, runs the kernel in the forward pass only.
GPU (`pytest -m gpu`, an sm_90 card): the compiled kernel against the XLA form, alone and in ViG.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import swiglu_mosaic
from pallas_kernels.swiglu_mosaic import (
    swiglu_up,
    swiglu_up_emulated,
    swiglu_up_reference,
)
from tests.helpers import assert_close, lower_for_cuda
from vig_jax.models import create_model, layers

# (rows of x, D, I): ViG-S and ViG-T widths, rows not a multiple of the kernel's 128.
SHAPES = [(256, 384, 1024), (200, 192, 512), (7, 64, 128)]
# h is rounded once to bf16 on both sides; their float32 sums may differ in order: 1 bf16 ulp.
TOL = 1e-2


def inputs(M, D, hidden, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, D), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (D, 2 * hidden), jnp.float32) / np.sqrt(D)
    return x, w


def rel_err(got, want):
    got, want = (np.asarray(a, np.float32) for a in (got, want))
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("M,D,hidden", SHAPES, ids=str)
def test_swiglu_up_lowers_for_cuda(mosaic_lowers, M, D, hidden):
    x = jax.ShapeDtypeStruct((M, D), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((D, 2 * hidden), jnp.float32)
    text = lower_for_cuda(swiglu_up, x, w)
    assert "mosaic_gpu" in text and "swiglu_up_mosaic" in text


@pytest.mark.parametrize("M,D,hidden", SHAPES, ids=str)
def test_swiglu_up_emulated_equals_xla_form(M, D, hidden):
    x, w = inputs(M, D, hidden)
    want = swiglu_up_reference(x, w)
    assert want.shape == (M, hidden) and want.dtype == jnp.bfloat16
    assert_close("emulated blocking", swiglu_up_emulated(x, w), want, 1e-6)


def test_swiglu_up_emulated_wrong_interleave_fails(monkeypatch):
    """Negative control: the weights read without the interleave pair W_a's blocks with the
    wrong columns."""
    x, w = inputs(64, 128, 256)
    monkeypatch.setattr(swiglu_mosaic, "interleave", lambda w_up: w_up)
    assert rel_err(swiglu_up_emulated(x, w), swiglu_up_reference(x, w)) > 0.1


@pytest.mark.parametrize(
    "D,hidden,match", [(96, 256, "D a multiple of 64"), (128, 200, "I of 128")], ids=str
)
def test_swiglu_up_rejects_widths_it_does_not_take(D, hidden, match):
    x, w = inputs(8, D, hidden)
    with pytest.raises(ValueError, match=match):
        swiglu_up(x, w)
    with pytest.raises(ValueError, match=r"w_up must be \[D, 2I\]"):
        swiglu_up(x, w[:-1])


def _vig(**kw):
    return create_model(
        "vig_t", num_classes=5, dtype=jnp.bfloat16, bigla_impl="chunked", depth=2, **kw
    )


def test_vig_mlp_mosaic_up_keeps_params_and_runs_in_inference_only(mosaic_lowers, monkeypatch):
    images = jnp.zeros((2, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(lambda: _vig().init(jax.random.key(0), images, train=False))
    form = jax.eval_shape(
        lambda: _vig(mlp_mosaic_up=True).init(jax.random.key(0), images, train=False)
    )
    assert jax.tree.structure(form) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, form, params)))
    # On this CPU the form does not apply; lowered for CUDA as if on a GPU it must, once a block.
    monkeypatch.setattr(layers, "_mosaic_up_applies", lambda D, I, dtype: dtype == jnp.bfloat16)
    model = _vig(mlp_mosaic_up=True)
    infer = lower_for_cuda(lambda p, x: model.apply(p, x, train=False), params, images)
    assert infer.count("swiglu_up_mosaic") >= 2, "one kernel per block"

    def train(p, x):
        return model.apply(p, x, train=True, rngs={"dropout": jax.random.key(1)})

    assert "swiglu_up_mosaic" not in lower_for_cuda(train, params, images)


@pytest.mark.gpu
@pytest.mark.parametrize("M,D,hidden", SHAPES + [(25088, 384, 1024)], ids=str)
def test_swiglu_up_gpu_matches_xla_form(M, D, hidden):
    x, w = inputs(M, D, hidden)
    got, want = jax.jit(swiglu_up)(x, w), jax.jit(swiglu_up_reference)(x, w)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    assert rel_err(got, want) < TOL


@pytest.mark.gpu
def test_vig_mlp_mosaic_up_gpu_logits_match_the_xla_form():
    images = jax.random.normal(jax.random.key(2), (4, 64, 64, 3), jnp.float32)
    params = _vig().init(jax.random.key(0), images, train=False)
    leaves, tree = jax.tree.flatten(params)  # unit scale: the MLP must move the logits
    params = tree.unflatten(
        [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    )
    want = jax.jit(lambda p, x: _vig().apply(p, x, train=False))(params, images)
    model = _vig(mlp_mosaic_up=True)
    got = jax.jit(lambda p, x: model.apply(p, x, train=False))(params, images)
    assert rel_err(got, want) < 5e-2  # bf16 through two blocks
