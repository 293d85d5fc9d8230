"""BiGLA: reference against a plain loop, chunked path against the reference, the dispatcher.

Errors are max |got - want| / max |want| (tests/helpers.py). Tolerances per dtype of q, k, v:

  dtype     tol    measured (outputs and all five gradients)
  float64   1e-10  <= 1e-15: both paths are exact up to rounding
  float32   1e-5   <= 6e-7 for typical gates, <= 2e-6 for gates down to -30 (other summation order)
  bfloat16  2e-2   <= 8e-3: both compute in float32; the bf16 rounding of o, dq, dk, dv differs by
                   up to an ulp (2^-8) where the float32 values straddle a rounding boundary
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.bigla import bigla, bigla_logits
from pallas_kernels.bigla.chunked import bigla_chunked
from pallas_kernels.bigla.reference import bigla_reference
from tests.helpers import GRAD_NAMES, assert_close, rel_err, run_fast

TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (N, H, K, V, chunk): every N with both chunk sizes; H, K, V cycle so each value appears 5 times.
# The last case has a chunk that is not a multiple of 16 (sub-blocks of 12).
CASES = [
    (1, 1, 16, 16, 16),
    (1, 3, 32, 64, 64),
    (7, 3, 32, 16, 16),
    (7, 1, 16, 64, 64),
    (64, 1, 32, 64, 16),
    (64, 3, 16, 16, 64),
    (65, 3, 16, 64, 16),
    (65, 1, 32, 16, 64),
    (196, 1, 16, 16, 16),
    (196, 3, 32, 64, 64),
    (50, 3, 16, 16, 24),
]


def _case_id(case):
    N, H, K, V, C = case
    return f"N{N}-H{H}-K{K}-V{V}-C{C}"


def _inputs(seed, B, N, H, K, V, dtype, gate_dtype=None, gate_scale=(1.0, 1.0)):
    """q, k, v ~ N(0, 1) in dtype; gates as the model makes them, log_sigmoid(N(0, 3²)) / 16, times
    gate_scale (forward, backward), in gate_dtype (default: dtype)."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, N, H, K)) for _ in range(2))
    v = rng.standard_normal((B, N, H, V))
    gf, gb = (
        np.asarray(jax.nn.log_sigmoid(3 * rng.standard_normal((B, N, H, K)))) / 16 * s
        for s in gate_scale
    )
    gate_dtype = gate_dtype or dtype
    return (
        *(jnp.asarray(x, dtype) for x in (q, k, v)),
        *(jnp.asarray(g, gate_dtype) for g in (gf, gb)),
    )


def _output_and_grads(fn, args, seed):
    """fn(*args) and its gradients for all five inputs under a random cotangent (not `.sum()`)."""

    def run(*args):
        o, vjp = jax.vjp(fn, *args)
        do = jax.random.normal(jax.random.key(seed), o.shape, jnp.float32).astype(o.dtype)
        return o, vjp(do)

    return run_fast(run, *args)


def _assert_matches_reference(fn, args, tol, seed=0):
    o, grads = _output_and_grads(fn, args, seed)
    o_ref, grads_ref = _output_and_grads(bigla_reference, args, seed)
    assert_close("o", o, o_ref, tol)
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert_close(name, got, want, tol)


def _loop_bigla(q, k, v, gf, gb):
    """The spec's recurrences as a plain numpy float64 loop over batch, head and token."""
    B, N, H, K = q.shape
    o = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            s = np.zeros((K, v.shape[-1]))
            for t in range(N):
                s = np.exp(gf[b, t, h])[:, None] * s + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] += q[b, t, h] @ s / 2
            s = np.zeros_like(s)
            for t in reversed(range(N)):
                s = np.exp(gb[b, t, h])[:, None] * s + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] += q[b, t, h] @ s / 2
    return o


def test_reference_matches_loop(x64):
    args = _inputs(1, 2, 9, 2, 3, 4, jnp.float64, gate_scale=(1.0, 8.0))
    want = _loop_bigla(*(np.asarray(x) for x in args))
    assert_close("o", bigla_reference(*args), want, TOL[jnp.float64])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunked_matches_reference(case, dtype, request):
    if dtype == jnp.float64:
        request.getfixturevalue("x64")
    N, H, K, V, C = case
    args = _inputs(N + H, 2, N, H, K, V, dtype)
    _assert_matches_reference(lambda *a: bigla_chunked(*a, chunk_size=C), args, TOL[dtype])


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_extreme_gates_finite_and_exact(chunk):
    """Per-token log gates down to -30 in some channels, about 0 in others (both directions)."""
    B, N, H, K, V = 1, 100, 2, 16, 16
    rng = np.random.default_rng(7)
    strong = rng.random((1, 1, H, K)) < 0.5  # mixed channels: decay e^-30 per token or almost none
    weak, hard = (s * rng.random((B, N, H, K)) for s in (-1e-3, -30.0))
    gf, gb = np.where(strong, hard, weak), np.where(strong, weak, hard)
    q, k, v, _, _ = _inputs(8, B, N, H, K, V, jnp.float32)
    args = (q, k, v, jnp.asarray(gf, jnp.float32), jnp.asarray(gb, jnp.float32))
    # assert_close also fails on any NaN/Inf in the output or gradients.
    chunked = lambda *a: bigla_chunked(*a, chunk_size=chunk)
    _assert_matches_reference(chunked, args, TOL[jnp.float32])


def test_chunked_bf16_inputs_fp32_gates():
    args = _inputs(3, 2, 130, 3, 32, 64, jnp.bfloat16, gate_dtype=jnp.float32)
    _assert_matches_reference(lambda *a: bigla_chunked(*a, chunk_size=64), args, TOL[jnp.bfloat16])


def test_swapped_gates_are_detected():
    """Negative control: with asymmetric gates, a path that swaps gf and gb must fail the check."""

    def run(q, k, v, gf, gb):
        right = bigla_chunked(q, k, v, gf, gb, chunk_size=16)
        swapped = bigla_chunked(q, k, v, gb, gf, chunk_size=16)
        return bigla_reference(q, k, v, gf, gb), right, swapped

    args = _inputs(5, 1, 40, 1, 16, 16, jnp.float32, gate_scale=(0.5, 16.0))
    want, right, swapped = run_fast(run, *args)
    assert rel_err(swapped, want) > 1e-2
    with pytest.raises(AssertionError, match=r"o: max abs err .* > tol"):
        assert_close("o", swapped, want, TOL[jnp.float32])
    assert_close("o", right, want, TOL[jnp.float32])


def test_bigla_auto_on_cpu_is_chunked():
    def run(*args):
        auto = bigla(*args, chunk_size=16)
        saved = bigla(*args, chunk_size=16, save_states=False)  # a pallas setting: no effect here
        return auto, saved, bigla_chunked(*args, chunk_size=16), bigla(*args, impl="reference")

    auto, saved, chunked, reference = run_fast(run, *_inputs(4, 2, 33, 3, 16, 16, jnp.float32))
    np.testing.assert_array_equal(auto, chunked)
    np.testing.assert_array_equal(saved, chunked)
    assert not np.array_equal(auto, reference)  # the two paths round differently
    assert_close("o", auto, reference, TOL[jnp.float32])


def test_bigla_auto_on_gpu_is_pallas_where_the_kernel_applies(monkeypatch):
    """On a GPU, auto picks the kernel for head dims and chunk sizes it takes, else chunked (a
    model with K = 8 must still run). The backend is faked: only the choice is tested here."""
    import pallas_kernels.bigla as dispatch

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_device", lambda: ("NVIDIA H200", "9.0"))
    auto = lambda K, V, chunk: dispatch._auto_impl((2, 196, 3, K), V, jnp.bfloat16, chunk)
    assert auto(32, 64, 64) == auto(32, 64, None) == "pallas"
    assert auto(128, 16, 16) == "pallas"
    assert auto(8, 16, 64) == "chunked"  # K below the kernel's 16
    assert auto(32, 48, 64) == "chunked"  # V not a power of two
    assert auto(32, 64, 48) == "chunked"  # chunk not a power of two
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert auto(32, 64, 64) == "chunked"


def test_bigla_auto_follows_the_measured_table(monkeypatch):
    """auto runs mosaic only where the table's nearest row (same GPU and head dims) measured it
    faster, and only where Mosaic GPU can run: a Hopper GPU, bf16, its head dims, no chunk_size,
    not for gates given as logits."""
    import pallas_kernels.bigla as dispatch
    from pallas_kernels.bigla import auto_table

    rows = (
        dict(device="H", K=32, V=64, N=196, BH=768, impl="pallas"),
        dict(device="H", K=32, V=64, N=4096, BH=24, impl="mosaic"),
        dict(device="H", K=16, V=32, N=4096, BH=24, impl="mosaic"),
        dict(device="H", K=128, V=128, N=4096, BH=24, impl="mosaic"),  # Mosaic lacks K = 128
    )
    monkeypatch.setattr(auto_table, "ROWS", rows)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    device = ["H", "9.0"]
    monkeypatch.setattr(dispatch, "_device", lambda: tuple(device))

    def auto(B, N, H, K=32, V=64, dtype=jnp.bfloat16, chunk=None, ok=True):
        return dispatch._auto_impl((B, N, H, K), V, dtype, chunk, ok)

    assert auto(128, 196, 6) == "pallas" and auto(64, 256, 12) == "pallas"  # near the 224² row
    assert auto(8, 4096, 3) == "mosaic" and auto(2, 16384, 3) == "mosaic"  # near the long row
    assert auto(8, 4096, 3, K=16, V=32) == "mosaic"
    assert auto(8, 4096, 3, K=128, V=128) == "pallas"  # the table says mosaic, Mosaic cannot
    assert auto(8, 4096, 3, K=64, V=64) == "pallas"  # no row for these head dims
    assert auto(8, 4096, 3, dtype=jnp.float32) == "pallas"
    assert auto(8, 4096, 3, chunk=32) == "pallas"
    assert auto(8, 4096, 3, ok=False) == "pallas"
    device[:] = ["H", "8.0"]
    assert auto(8, 4096, 3) == "pallas"  # not Hopper
    device[:] = ["other GPU", "9.0"]
    assert auto(8, 4096, 3) == "pallas"


def test_auto_table_rows_name_their_faster_kernel():
    from pallas_kernels.bigla import auto_table

    assert auto_table.ROWS and auto_table.SOURCE
    for row in auto_table.ROWS:
        assert set(row) == {"device", "K", "V", "N", "BH", "impl", "ms", "pass"}, row
        assert row["pass"] in ("fwd", "fwd_bwd") and set(row["ms"]) == {"pallas", "mosaic"}
        assert row["impl"] == min(row["ms"], key=row["ms"].get), row


def test_bigla_logits_paths_agree():
    """Gates from logits: the chunked path (gates in XLA, float32) and the pallas one (gates in
    the kernel, interpret mode; also with the forward's states saved for the backward) against
    the reference on log_sigmoid(x) / 16, with gradients of the logits; a normalizer of 0 is
    rejected."""
    rng = np.random.default_rng(8)
    q, k, v, _, _ = _inputs(8, 1, 40, 2, 16, 16, jnp.float32)
    xf, xb = (jnp.asarray(3 * rng.standard_normal(q.shape), jnp.float32) for _ in range(2))
    want_fn = lambda q, k, v, xf, xb: bigla_reference(
        q, k, v, jax.nn.log_sigmoid(xf) / 16, jax.nn.log_sigmoid(xb) / 16
    )
    o_ref, grads_ref = _output_and_grads(want_fn, (q, k, v, xf, xb), 0)
    pallas = {"impl": "pallas", "interpret": True}
    for kwargs in ({"impl": "chunked"}, pallas, {**pallas, "save_states": False}):
        fn = lambda *a, kw=kwargs: bigla_logits(*a, chunk_size=16, **kw)
        o, grads = _output_and_grads(fn, (q, k, v, xf, xb), 0)
        assert_close(f"o {kwargs}", o, o_ref, TOL[jnp.float32])
        for name, got, want in zip(("dq", "dk", "dv", "dxf", "dxb"), grads, grads_ref, strict=True):
            assert_close(f"{name} {kwargs}", got, want, TOL[jnp.float32])
    with pytest.raises(ValueError, match="normalizer=0"):
        bigla_logits(q, k, v, xf, xb, normalizer=0)


def _good():
    return _inputs(0, 1, 4, 2, 8, 8, jnp.float32)


def _bad_args():
    q, k, v, gf, gb = _good()
    interpret = r"interpret=True applies to impl='pallas' only, got impl="
    return {  # case: (args, kwargs, the error message it must give)
        "q_rank": ((q[0], k[0], v[0], gf[0], gb[0]), {}, r"q must be \[B, N, H, K\]"),
        "k_shape": ((q, k[:, :3], v, gf, gb), {}, r"k\.shape=.* must equal q\.shape"),
        "gf_shape": ((q, k, v, gf[..., :4], gb), {}, r"gf\.shape=.* must equal q\.shape"),
        "gb_shape": ((q, k, v, gf, gb[:, :, :1]), {}, r"gb\.shape=.* must equal q\.shape"),
        "v_tokens": ((q, k, v[:, :3], gf, gb), {}, r"v must be \[B, N, H, V\] with B, N, H of q"),
        "v_rank": ((q, k, v[..., 0], gf, gb), {}, r"v must be \[B, N, H, V\] with B, N, H of q"),
        "dtype_mismatch": (
            (q, k.astype(jnp.bfloat16), v, gf, gb),
            {},
            "q, k, v must share a dtype",
        ),
        "int_inputs": ((q, k, v.astype(jnp.int32), gf, gb), {}, "v.dtype=int32 is not a float"),
        "int_gates": ((q, k, v, gf.astype(jnp.int32), gb), {}, "gf.dtype=int32 is not a float"),
        "unknown_impl": ((q, k, v, gf, gb), {"impl": "triton"}, "impl='triton' is not one of"),
        "chunk_zero": ((q, k, v, gf, gb), {"chunk_size": 0}, "chunk_size=0 must be a positive"),
        "chunk_float": (
            (q, k, v, gf, gb),
            {"chunk_size": 16.0},
            r"chunk_size=16\.0 must be a positive integer",
        ),
        "interpret_not_pallas": (
            (q, k, v, gf, gb),
            {"impl": "chunked", "interpret": True},
            interpret + "'chunked'",
        ),
        "interpret_auto": ((q, k, v, gf, gb), {"interpret": True}, interpret + "'auto'"),
    }


@pytest.mark.parametrize("case", list(_bad_args()))
def test_bigla_rejects_bad_input(case):
    args, kwargs, message = _bad_args()[case]
    with pytest.raises(ValueError, match=message):
        bigla(*args, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU-only error")
def test_bigla_pallas_on_cpu_needs_interpret():
    with pytest.raises(ValueError, match="needs a GPU"):
        bigla(*_good(), impl="pallas")
    with pytest.raises(ValueError, match="impl='mosaic' needs a Hopper GPU"):
        bigla(*_good(), impl="mosaic")


@pytest.mark.parametrize("shape", [(2, 16, 3, 32, 64), (2, 64, 3, 16, 32)], ids=str)
def test_chunked_single_chunk_default_compile_matches_reference(shape):
    """One chunk (N <= C) at the default XLA:CPU optimisation level, forward and gradients.

    Regression: written as `A v + (q e^G) S_in`, an add of two einsums, the chunked output was
    garbage (up to 1e34) under a default-level jit on jax 0.10.2 when NT = 1; -O0 hid it.
    """
    B, N, H, K, V = shape
    args = _inputs(7, B, N, H, K, V, jnp.float32)
    do = jax.random.normal(jax.random.key(1), (B, N, H, V), jnp.float32)

    def out_and_grads(fn):
        def run(*args):
            o, vjp = jax.vjp(fn, *args)
            return o, vjp(do)

        return jax.jit(run)(*args)

    chunked = lambda *a: bigla_chunked(*a, chunk_size=64)
    want = out_and_grads(bigla_reference)
    for _ in range(3):  # the failure read stale memory: dirty freed buffers first
        jax.block_until_ready(jnp.full((1 << 20,), 1e30, jnp.float32) * 3)
        assert_close("o (forward alone)", jax.jit(chunked)(*args), want[0], TOL[jnp.float32])
    got = out_and_grads(chunked)
    assert_close("o", got[0], want[0], TOL[jnp.float32])
    for name, g, w in zip(GRAD_NAMES, got[1], want[1], strict=True):
        assert_close(name, g, w, TOL[jnp.float32])
