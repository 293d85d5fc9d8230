"""Mosaic GPU BiGLA forward (pallas_kernels/bigla/mosaic.py) against the lax.scan reference.

CPU: both kernels (chunks, states) cross-lower for CUDA (Mosaic GPU's Python lowering: layouts,
wgmma shapes and swizzles, TMA slices) at ViG shapes and every supported head-dim pair; the kernel
bodies' arithmetic runs in jnp (`MosaicParams(emulate=True)`) against the float64 reference, the
states and their span plans against the XLA scan and the sequential plan, with negative controls.
GPU (`pytest -m gpu`, an sm_90 card): the compiled kernels, forward and the custom_vjp
gradients. Tolerances are max|Δ| / max|ref| (tests/helpers.assert_close); bf16 q, k, v as
tests/test_bigla_pallas.py's GPU_TOL."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.bigla.mosaic import MosaicParams, bigla_mosaic
from tests.helpers import assert_close, lower_for_cuda, run_fast
from tests.test_bigla_pallas import check_all, fwd_and_grads, make_inputs, reference64

TOL_O, TOL_GRAD = 1e-2, 2e-2  # bf16 q, k, v (fp32 accumulation), as GPU_TOL[bfloat16]


def states_for(V):
    """The Mosaic states kernel where it applies (V >= 64), else the XLA scan (no Triton)."""
    return "mosaic" if V >= 64 else "xla"


def emulated(V, states=None):
    return MosaicParams(states=states or states_for(V), backward="xla", emulate=True)


def shapes(B, N, H, K, V):
    """q, k, v (bf16), gf, gb (fp32) as ShapeDtypeStructs."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    return [jax.ShapeDtypeStruct((B, N, H, d), dt) for d, dt in ((K, bf16),) * 2 + ((V, bf16),)] + [
        jax.ShapeDtypeStruct((B, N, H, K), f32)
    ] * 2


@pytest.mark.parametrize(
    "shape",
    [(2, 196, 6, 32, 64), (8, 4096, 3, 32, 64)],
    ids=["vig_s_224", "vig_t_1024"],
)
@pytest.mark.parametrize("states", ["mosaic", "pallas", "xla"])
def test_bigla_mosaic_lowers_for_cuda(mosaic_lowers, shape, states):
    """Forward and backward cross-lower; the forward's chunk work is the Mosaic GPU kernel, and
    so is the states work with states="mosaic"."""

    def fwd_bwd(q, k, v, gf, gb, do):
        o, vjp = jax.vjp(
            lambda *x: bigla_mosaic(*x, params=MosaicParams(states=states)), q, k, v, gf, gb
        )
        return o, vjp(do)

    B, N, H, K, V = shape
    do = jax.ShapeDtypeStruct((B, N, H, V), jnp.bfloat16)
    text = lower_for_cuda(fwd_bwd, *shapes(*shape), do)
    assert "mosaic_gpu" in text and "bigla_mosaic_fwd_chunks" in text
    triton_states = any(f"bigla_fwd_{n}" in text for n in ("states", "span_summaries"))
    assert triton_states == (states == "pallas")
    assert ("bigla_mosaic_fwd_states" in text) == (states == "mosaic")
    assert "bigla_bwd" in text  # the Triton backward


@pytest.mark.parametrize(
    "K,V", [(16, 32), (16, 64), (16, 128), (32, 32), (32, 64), (32, 128), (64, 64), (64, 128)]
)
def test_bigla_mosaic_lowers_every_head_dim_pair(mosaic_lowers, K, V):
    """Swizzles follow K and V (32, 64 or 128 bytes): each supported pair must pass Mosaic GPU's
    wgmma and transfer checks, with the Mosaic states kernel where it applies (V >= 64).
    N = 130: three chunks, the last one padded."""
    params = MosaicParams(states=states_for(V))
    text = lower_for_cuda(lambda *x: bigla_mosaic(*x, params=params), *shapes(1, 130, 2, K, V))
    assert "bigla_mosaic_fwd_chunks" in text
    assert ("bigla_mosaic_fwd_states" in text) == (V >= 64)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 8, 1, 48, 64), "K in"),
        ((1, 8, 1, 32, 16), "V in"),
        ((1, 8, 1, 64, 32), "V >= K"),
    ],
)
def test_bigla_mosaic_rejects_unsupported_head_dims(shape, match):
    args, _ = make_inputs(shape, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        bigla_mosaic(*args)


def test_bigla_mosaic_rejects_other_dtypes_and_params():
    args, _ = make_inputs((1, 8, 1, 32, 64), dtype=jnp.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        bigla_mosaic(*args)
    args, _ = make_inputs((1, 8, 1, 32, 64), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="states="):
        bigla_mosaic(*args, params=MosaicParams(states="triton"))
    with pytest.raises(ValueError, match="backward="):
        bigla_mosaic(*args, params=MosaicParams(backward="mosaic"))
    args, _ = make_inputs((1, 8, 1, 16, 32), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="V >= 64"):
        bigla_mosaic(*args, params=MosaicParams(states="mosaic"))
    with pytest.raises(ValueError, match="states_span"):
        bigla_mosaic(*args, params=MosaicParams(states="xla", states_span=-1))


# (B, N, H, K, V), gates: N in {1, 17, 64, 196, 1000, 4096} (one token, a padded chunk, exactly
# one chunk, ViG-S's 196, many chunks, ViG-T 1024's length), both ViG head-dim pairs, and gates
# at the supported bound (-10 per token on half of the channels).
PARITY_CASES = [
    pytest.param((1, 1, 2, 16, 32), "typical", id="N1-K16V32"),
    pytest.param((2, 17, 2, 32, 64), "typical", id="N17-B2"),
    pytest.param((1, 64, 2, 16, 32), "typical", id="N64-K16V32"),
    pytest.param((2, 196, 2, 32, 64), "typical", id="N196-vig_s"),
    pytest.param((1, 196, 1, 32, 64), "very_negative", id="N196-gates-10"),
    pytest.param((1, 1000, 1, 16, 32), "typical", id="N1000-K16V32"),
    pytest.param((1, 4096, 1, 32, 64), "typical", id="N4096"),
]


@pytest.mark.parametrize("shape,gates", PARITY_CASES)
def test_bigla_mosaic_emulated_matches_reference(shape, gates):
    """The kernel bodies in jnp (same bf16 rounding points; the states kernel's where V >= 64),
    forward and, through the custom_vjp, the XLA backward's gradients."""
    args, do = make_inputs(shape, dtype=jnp.bfloat16, gates=gates)
    f = lambda *a: bigla_mosaic(*a, params=emulated(shape[-1]))
    got = run_fast(lambda a, d: fwd_and_grads(f, a, d), args, do)
    check_all(got, reference64(args, do), TOL_O, TOL_GRAD)


@pytest.mark.parametrize(
    "shape,gates",
    [
        pytest.param((1, 130, 2, 16, 32), "typical", id="N130"),
        pytest.param((2, 70, 1, 32, 64), "very_negative", id="N70-gates-10"),
    ],
)
def test_bigla_mosaic_emulated_with_triton_states_and_backward(shape, gates):
    """The default path's states and backward (the Triton kernels, interpret mode) feed the
    emulated body: their [B, H, NTp * K, V] layout as the kernel indexes it."""
    args, do = make_inputs(shape, dtype=jnp.bfloat16, gates=gates)
    f = lambda *a: bigla_mosaic(*a, params=MosaicParams(emulate=True))
    got = run_fast(lambda a, d: fwd_and_grads(f, a, d), args, do)
    check_all(got, reference64(args, do), TOL_O, TOL_GRAD)


@pytest.mark.parametrize("states", ["mosaic", "xla"])
def test_bigla_mosaic_emulated_swapped_gates_fail(states):
    """Negative control: gf and gb swapped must fail the forward check the right order passes."""
    (q, k, v, gf, gb), do = make_inputs((1, 196, 2, 32, 64), dtype=jnp.bfloat16)
    want = reference64((q, k, v, gf, gb), do)[0]
    f = jax.jit(lambda *a: bigla_mosaic(*a, params=emulated(64, states)))
    assert_close("o", f(q, k, v, gf, gb), want, TOL_O)
    with pytest.raises(AssertionError, match="relative"):
        assert_close("o", f(q, k, v, gb, gf), want, TOL_O)


@pytest.mark.parametrize("gates", ["typical", "very_negative"])
def test_mosaic_states_match_xla_states(gates):
    """The states kernel's arithmetic alone: its transposed entering states (emulated) against
    those of chunked.py's scan, both rounded to bf16 at the end (B 2, N 200: four chunks, the
    last one padded)."""
    from pallas_kernels.bigla import mosaic

    (_, k, v, gf, gb), _ = make_inputs((2, 200, 2, 32, 64), dtype=jnp.bfloat16, gates=gates)
    n_pad = 256
    Gf, _ = mosaic._in_chunk_cumsums(gf, n_pad)
    _, Gb = mosaic._in_chunk_cumsums(gb, n_pad)
    padded = (mosaic._pad(k, n_pad), mosaic._pad(v, n_pad), Gf, Gb)
    want = mosaic._entering_states((k, v, gf, gb), padded, emulated(64, "xla"))
    got = mosaic._entering_states((k, v, gf, gb), padded, emulated(64, "mosaic"))
    for name, g, w in zip(("S_f^T", "S_b^T"), got, want, strict=True):
        assert g.shape == w.shape == (2, 2, 4 * 64, 32)
        assert_close(name, g, w, 1e-2)


def mosaic_states(args, states_span):
    """The emulated Mosaic states kernel's (S_f^T, S_b^T) for the first NT chunks, as
    `bigla_mosaic` computes them with this states_span."""
    from pallas_kernels.bigla import mosaic

    _, k, v, gf, gb = args
    B, N, H, _ = k.shape
    params = MosaicParams(states="mosaic", states_span=states_span, emulate=True)
    nt, span = -(-N // 64), mosaic._mosaic_span(B, H, N, params)
    n_pad = -(-nt // span) * span * 64
    Gf, _ = mosaic._in_chunk_cumsums(gf, n_pad)
    _, Gb = mosaic._in_chunk_cumsums(gb, n_pad)
    padded = (mosaic._pad(k, n_pad), mosaic._pad(v, n_pad), Gf, Gb)
    states = mosaic._entering_states((k, v, gf, gb), padded, params)
    return [x[:, :, : nt * v.shape[-1]] for x in states]


@pytest.mark.parametrize("states_span", [1, 2, 3, None], ids=lambda s: f"span{s}")
def test_mosaic_states_span_plans_match_sequential(states_span):
    """Spans of chunks (a summary launch, the XLA scan over spans, a walk from the scanned
    states; NT = 5, so spans of 2 and 3 end in padding chunks) give the states of one block
    walking all chunks. None: the auto plan (B * H = 2 blocks -> spans of 1)."""
    args, _ = make_inputs((1, 300, 2, 32, 64), dtype=jnp.bfloat16, gates="very_negative")
    for name, got, want in zip(
        ("S_f^T", "S_b^T"), mosaic_states(args, states_span), mosaic_states(args, 0), strict=True
    ):
        assert_close(name, got, want, 1e-2)


def test_mosaic_states_span_scan_is_load_bearing(monkeypatch):
    """Negative control: a scan over spans that drops the decay between spans must fail."""
    from pallas_kernels.bigla import pallas

    args, _ = make_inputs((1, 300, 2, 32, 64), dtype=jnp.bfloat16)
    want = mosaic_states(args, 0)
    scan = pallas._scan_spans
    monkeypatch.setattr(pallas, "_scan_spans", lambda t, *rest: scan([0 * x for x in t], *rest))
    got = mosaic_states(args, 2)
    with pytest.raises(AssertionError, match="relative"):
        assert_close("S_f^T", got[0], want[0], 1e-2)


# ----------------------------------------------------------------------------------------------
# Compiled on an sm_90 GPU.


def check_gpu(shape, params, gates="typical"):
    args, do = make_inputs(shape, dtype=jnp.bfloat16, gates=gates)
    f = lambda *a: bigla_mosaic(*a, params=params)
    got = jax.jit(lambda a, d: fwd_and_grads(f, a, d))(args, do)
    check_all(got, reference64(args, do), TOL_O, TOL_GRAD)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,gates", PARITY_CASES)
@pytest.mark.parametrize("states", ["mosaic", "pallas", "xla"])
def test_bigla_mosaic_gpu_matches_reference(shape, gates, states):
    if states == "mosaic" and shape[-1] < 64:
        states = "xla"  # V < 64: the states kernel does not apply (the case still runs)
    check_gpu(shape, MosaicParams(states=states), gates)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "K,V", [(16, 64), (16, 128), (32, 32), (32, 128), (64, 64), (64, 128)], ids=str
)
@pytest.mark.parametrize("states", ["mosaic", "pallas"])
def test_bigla_mosaic_gpu_other_head_dims(K, V, states):
    check_gpu((2, 130, 2, K, V), MosaicParams(states=states if V >= 64 else "xla"))


@pytest.mark.gpu
@pytest.mark.parametrize("states", ["mosaic", "pallas"])
@pytest.mark.parametrize("shape", [(16, 196, 6, 32, 64), (2, 4096, 3, 32, 64)], ids=str)
def test_bigla_mosaic_gpu_vig_shapes(shape, states):
    check_gpu(shape, MosaicParams(states=states))


@pytest.mark.gpu
@pytest.mark.parametrize("span", [None, 0, 8], ids=["auto-span1", "sequential", "span8"])
def test_bigla_mosaic_gpu_long_n_states_plans(span):
    """Long N, small batch (B * H = 2, NT = 128): the Mosaic states plans side by side."""
    check_gpu((1, 8192, 2, 32, 64), MosaicParams(states="mosaic", states_span=span))


@pytest.mark.gpu
@pytest.mark.parametrize("states", ["mosaic", "pallas"])
def test_bigla_mosaic_gpu_swapped_gates_fail(states):
    (q, k, v, gf, gb), do = make_inputs((2, 196, 2, 32, 64), dtype=jnp.bfloat16)
    want = reference64((q, k, v, gf, gb), do)[0]
    f = jax.jit(lambda *a: bigla_mosaic(*a, params=MosaicParams(states=states)))
    assert_close("o", f(q, k, v, gf, gb), want, TOL_O)
    with pytest.raises(AssertionError, match="relative"):
        assert_close("o", f(q, k, v, gb, gf), want, TOL_O)


@pytest.mark.gpu
def test_bigla_dispatch_mosaic_gpu():
    """`bigla(impl="mosaic")` is `bigla_mosaic` with its default params, forward and gradients."""
    from pallas_kernels.bigla import bigla

    args, do = make_inputs((2, 196, 3, 32, 64), dtype=jnp.bfloat16)
    got = jax.jit(lambda a, d: fwd_and_grads(lambda *x: bigla(*x, impl="mosaic"), a, d))(args, do)
    check_all(got, reference64(args, do), TOL_O, TOL_GRAD)
