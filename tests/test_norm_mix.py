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


def to64(arrays):
    """The arrays as float64 jax arrays (call under jax.enable_x64)."""
    return [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


def reference64(args, out_act):
    with jax.enable_x64():
        return np.asarray(norm_mix_reference(*to64(args), eps=EPS, out_act=out_act))


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


def grads(fn, args, w, out_act, **kw):
    """Gradients of sum(fn(*args) * w) with respect to all five inputs."""
    loss = lambda *a: jnp.sum(fn(*a, eps=EPS, out_act=out_act, **kw).astype(jnp.float32) * w)
    return jax.grad(loss, argnums=range(5))(*args)


def grads64(args, w, out_act):
    with jax.enable_x64():
        *args64, w64 = to64([*args, w])
        return grads(norm_mix_reference, args64, w64, out_act)


GRAD_NAMES = ("do", "dxs", "dm", "d_o_scale", "d_xs_scale")


@pytest.mark.parametrize(
    "backward, dtype, out_act",
    [
        ("pallas", jnp.float32, True),
        ("pallas", jnp.bfloat16, False),
        ("reference", jnp.float32, True),
    ],
    ids=["kernel-f32-silu", "kernel-bf16", "xla-f32-silu"],
)
def test_norm_mix_gradients_match_float64(backward, dtype, out_act):
    # 37 tokens: one partial block of 64 rows, whose masked rows must add nothing to the scales.
    args = make_inputs(2, 37, 2, 32, dtype, seed=1)
    w = jnp.cos(jnp.arange(2 * 37 * 64, dtype=jnp.float32)).reshape(2, 37, 64)
    kernel = lambda *a, **k: norm_mix(*a, **k, interpret=True, backward=backward)
    got = run_fast(lambda *a: grads(kernel, a, w, out_act), *args)
    want = grads64(args, w, out_act)
    tol = 1e-5 if dtype == jnp.float32 else 2 * BF16_TOL
    for name, g, r, a in zip(GRAD_NAMES, got, want, args, strict=True):
        assert g.dtype == a.dtype, name
        assert_close(name, g, r, tol)
    # Negative control: the gradients without (or with) the SiLU are far from these.
    other = grads64(args, w, not out_act)
    assert max(rel_err(o, r) for o, r in zip(other, want, strict=True)) > 100 * tol


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
    # Gradients: the replicated scales' are summed over the shards.
    w = jnp.sin(jnp.arange(got.size, dtype=jnp.float32)).reshape(got.shape)

    def grads_under_mesh(*a):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            kernel = lambda *b, **k: norm_mix(*b, **k, interpret=True, backward="pallas")
            return grads(kernel, a, w, False)

    got = jax.jit(grads_under_mesh).lower(*sharded).compile(FAST_COMPILE)(*sharded)
    for name, g, r in zip(GRAD_NAMES, got, grads64(args, w, False), strict=True):
        assert_close(f"{name} under a mesh", g, r, 1e-5)


def test_norm_mix_kernels_lower_to_triton_for_cuda():
    """Forward and backward kernels cross-lowered for CUDA on the CPU (ViG-S 224² head shape)."""

    def fwd_bwd(*a):
        f = lambda *b: norm_mix(*b, eps=EPS, out_act=True, impl="pallas", backward="pallas")
        y, vjp = jax.vjp(f, *a[:5])
        return y, vjp(a[5])

    B, N, H, V = 2, 196, 6, 64
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((V,), jnp.float32)
    shapes = (
        bf16(B, N, H, V),
        bf16(B, N, H * V),
        bf16(B, N, H * V),
        scale,
        scale,
        bf16(B, N, H * V),
    )
    text = jax.jit(fwd_bwd).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "norm_mix_bwd" in text and text.count("norm_mix") >= 2


def test_norm_mix_chooses_and_rejects():
    o, xs, m, s1, s2 = make_inputs(1, 4, 2, 16, jnp.float32)
    assert not kernel_runs(o.shape, o.dtype)  # CPU: auto takes the reference
    assert kernel_runs(o.shape, o.dtype, interpret=True)
    assert not kernel_runs(o.shape, o.dtype, impl="reference", interpret=True)
    cases = [
        (dict(impl="triton"), "impl="),
        (dict(backward="xla"), "backward="),
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
    """The compiled kernels: forward and the five gradients against float64."""
    args = make_inputs(*shape, dtype)
    got = jax.jit(lambda *a: norm_mix(*a, eps=EPS, out_act=True, impl="pallas"))(*args)
    f32 = dtype == jnp.float32
    assert_close("norm_mix (GPU)", got, reference64(args, True), 4 * F32_TOL if f32 else BF16_TOL)
    w = jnp.cos(jnp.arange(got.size, dtype=jnp.float32)).reshape(got.shape)
    kernel = lambda *a, **k: norm_mix(*a, **k, impl="pallas", backward="pallas")
    got = jax.jit(lambda *a: grads(kernel, a, w, True))(*args)
    for name, g, r in zip(GRAD_NAMES, got, grads64(args, w, True), strict=True):
        assert_close(f"{name} (GPU)", g, r, 1e-4 if f32 else 2 * BF16_TOL)
