"""pallas_kernels/norm_mix.py: the GLA output mix kernel against its float64 reference.

CPU: the kernel in Pallas interpret mode (odd token counts exercise the masked rows), the custom_vjp
wiring, the per-shard run under a mesh, the errors. GPU (`pytest -m gpu`): the compiled kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.norm_mix import kernel_runs, norm_mix, norm_mix_reference
from tests.helpers import FAST_COMPILE, assert_close, rel_err, run_fast

EPS = 1e-6
F32_TOL = 2e-6  # float32 kernel vs float64: rounding only (~3e-7 measured)
BF16_TOL = 2.0**-8  # bf16 result: its final rounding only


def make_inputs(B, N, H, V, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    o = 3.0 * jax.random.normal(ks[0], (B, N, H, V))
    xs = 0.5 * jax.random.normal(ks[1], (B, N, H * V))
    m = 2.0 * jax.random.normal(ks[2], (B, N, H * V))
    s1, s2 = (1.0 + 0.3 * jax.random.normal(k, (V,)) for k in ks[3:])
    return [x.astype(dtype) for x in (o, xs, m)] + [s1, s2]


def reference64(args, out_act):
    with jax.enable_x64():
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        return np.asarray(norm_mix_reference(*args64, eps=EPS, out_act=out_act))


@pytest.mark.parametrize(
    "shape, dtype, out_act",
    [
        ((2, 70, 3, 32), jnp.float32, True),  # 70 tokens: a partial second block of 64 rows
        ((1, 1, 2, 64), jnp.float32, False),
        ((2, 49, 2, 64), jnp.bfloat16, True),
    ],
    ids=["f32-N70-silu", "f32-N1", "bf16-N49-silu"],
)
def test_norm_mix_interpret_matches_float64_reference(shape, dtype, out_act):
    args = make_inputs(*shape, dtype)
    f = lambda *a: norm_mix(*a, eps=EPS, out_act=out_act, interpret=True)
    got = run_fast(f, *args)
    assert got.dtype == dtype and got.shape == args[1].shape
    want = reference64(args, out_act)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert_close("norm_mix", got, want, tol)
    # Negative controls: the two norms' scales swapped, or no SiLU, are far outside the tolerance.
    swapped = reference64(args[:3] + args[3:][::-1], out_act)
    assert rel_err(swapped, want) > 100 * tol
    assert rel_err(reference64(args, not out_act), want) > 100 * tol


def test_norm_mix_gradients_are_the_reference_gradients():
    # float32, all five inputs: the kernel's custom_vjp against autodiff of the float64 reference.
    args = make_inputs(2, 37, 2, 32, jnp.float32, seed=1)
    w = jnp.cos(jnp.arange(2 * 37 * 64, dtype=jnp.float32)).reshape(2, 37, 64)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a, eps=EPS, out_act=True) * w.astype(a[1].dtype))

    kernel = lambda *a, **k: norm_mix(*a, **k, interpret=True)
    got = run_fast(jax.grad(loss(kernel), argnums=range(5)), *args)
    with jax.enable_x64():
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        want = jax.grad(loss(norm_mix_reference), argnums=range(5))(*args64)
    for name, g, r in zip(("do", "dxs", "dm", "d_o_scale", "d_xs_scale"), got, want, strict=True):
        assert g.dtype == jnp.float32
        assert_close(name, g, r, 1e-5)


def test_norm_mix_runs_per_batch_shard_under_a_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    args = make_inputs(4, 20, 2, 16, jnp.float32)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    sharded = [jax.device_put(a, batch) for a in args[:3]] + args[3:]

    def under_mesh(*a):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return norm_mix(*a, eps=EPS, out_act=False, interpret=True)

    compiled = jax.jit(under_mesh).lower(*sharded).compile(FAST_COMPILE)
    assert compiled.as_text().count("all-gather(") == 0
    got = compiled(*sharded)
    assert got.sharding.spec == PartitionSpec("data")
    assert_close("norm_mix under a mesh", got, reference64(args, False), F32_TOL)


def test_norm_mix_chooses_and_rejects():
    o, xs, m, s1, s2 = make_inputs(1, 4, 2, 16, jnp.float32)
    assert not kernel_runs(o.shape, o.dtype)  # CPU: auto takes the reference
    assert kernel_runs(o.shape, o.dtype, interpret=True)
    assert not kernel_runs(o.shape, o.dtype, impl="reference", interpret=True)
    cases = [
        (dict(impl="triton"), "impl="),
        (dict(xs=xs[..., :-1]), "xs must be"),
        (dict(m=m.astype(jnp.bfloat16)), "m must be"),
        (dict(o_scale=s1[:-1]), "o_scale must be"),
        (dict(o=o[0]), "o must be"),
    ]
    for change, match in cases:
        kw = dict(o=o, xs=xs, m=m, o_scale=s1, xs_scale=s2, eps=EPS, out_act=False) | change
        with pytest.raises(ValueError, match=match):
            norm_mix(**kw)
    o48 = jnp.zeros((1, 4, 1, 48))
    with pytest.raises(ValueError, match="needs V in"):
        norm_mix(o48, o48.reshape(1, 4, 48), o48.reshape(1, 4, 48), s1[:1].repeat(48),
                 s1[:1].repeat(48), eps=EPS, out_act=False, impl="pallas")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", [(4, 70, 3, 32), (16, 196, 6, 64)], ids=["small", "vig_s"])
def test_norm_mix_gpu_matches_reference(shape, dtype):
    args = make_inputs(*shape, dtype)
    got = jax.jit(lambda *a: norm_mix(*a, eps=EPS, out_act=True, impl="pallas"))(*args)
    assert_close(
        "norm_mix (GPU)",
        got,
        reference64(args, True),
        4 * F32_TOL if dtype == jnp.float32 else BF16_TOL,
    )
