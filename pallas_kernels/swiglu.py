"""The SwiGLU MLP's up projection and gate as one Pallas GPU (Triton) kernel (experimental: the
models' `mlp_fused_up` inference form, off by default; kernel, launcher, custom_vjp and reference
together).

    h = SiLU(x @ W_a) * (x @ W_b)

x [..., D] and W_a, W_b [D, I] -> h [..., I] in x's dtype, both products accumulated in float32 and
the gate applied to the float32 accumulators, rounded once. XLA runs this as two matmuls (cuBLAS),
each writing its [M, I] output, and an elementwise pass that reads both and writes h: at ViG-S 224²
(M = 25,088 tokens, D = 384, I = 1024, bf16) that is ~150 MB per layer written and read back, and
the elementwise pass took ~47 µs per layer of the inference step (profile_step on an H200). The
kernel writes only h: one program per [BM, BN] tile of h holds both accumulators and walks D in
steps of BK.

Whether a Triton matmul here is as fast as cuBLAS's two is the open question; `benchmarks/
bench_swiglu.py` times it against the XLA form. The backward recomputes the two products in XLA
(the vjp of `swiglu_up_reference`), so for training the kernel saves nothing; it is an inference
candidate.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.bigla import _per_batch_shard
from pallas_kernels.bigla.pallas import _dot, _matmul_dtype, triton_call

IMPLS = ("auto", "reference", "pallas")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernel's tiling: a program computes a [block_m, block_n] tile of h (both accumulators)
    and walks D in steps of block_k; Triton warps and pipelining stages."""

    block_m: int = 128
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """ "BM,BN,BK,WARPS,STAGES" (e.g. "128,64,64,4,3") -> Tiles."""
        values = text.split(",")
        if len(values) != 5 or not all(v.strip().isdigit() for v in values):
            raise ValueError(f"tiles must be 'BM,BN,BK,WARPS,STAGES' (5 integers); got {text!r}")
        return cls(*(int(v) for v in values))


TILES = Tiles()


def swiglu_up_reference(x, w_a, w_b):
    """The definition: SiLU(x @ w_a) * (x @ w_b), float32 accumulators (float64 for float64
    inputs), rounded to x.dtype once."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    a = lax.dot_general(x, w_a.astype(x.dtype), dims, preferred_element_type=acc)
    b = lax.dot_general(x, w_b.astype(x.dtype), dims, preferred_element_type=acc)
    return (jax.nn.silu(a) * b).astype(x.dtype)


def _kernel(x_ref, wa_ref, wb_ref, h_ref, *, m, d, mm, tiles):
    """One [block_m, block_n] tile of h: rows i, columns j of the program; D in steps of block_k
    (rows past M and columns of D past d read 0)."""
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = (i * bm + jnp.arange(bm, dtype=jnp.int32) < m)[:, None]

    def step(kk, accs):
        k_ok = kk * bk + jnp.arange(bk, dtype=jnp.int32) < d
        rows, ks = pl.ds(i * bm, bm), pl.ds(kk * bk, bk)
        x = pltriton.load(x_ref.at[rows, ks], mask=row_ok & k_ok[None, :], other=0.0)
        cols = pl.ds(j * bn, bn)
        wa = pltriton.load(wa_ref.at[ks, cols], mask=k_ok[:, None], other=0.0)
        wb = pltriton.load(wb_ref.at[ks, cols], mask=k_ok[:, None], other=0.0)
        return accs[0] + _dot(x, wa, mm), accs[1] + _dot(x, wb, mm)

    zeros = jnp.zeros((bm, bn), jnp.float32)
    a, b = lax.fori_loop(0, math.ceil(d / bk), step, (zeros, zeros))
    h = a * jax.nn.sigmoid(a) * b
    rows = pl.ds(i * bm, bm)
    pltriton.store(h_ref.at[rows, pl.ds(j * bn, bn)], h.astype(h_ref.dtype), mask=row_ok)


def _pallas(x, w_a, w_b, interpret, tiles):
    """The kernel on x [M, D] (flattened by the caller)."""
    m, d = x.shape
    width = w_a.shape[1]
    full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
    kernel = functools.partial(_kernel, m=m, d=d, mm=_matmul_dtype(x.dtype), tiles=tiles)
    return triton_call(
        kernel,
        "swiglu_up",
        (math.ceil(m / tiles.block_m), width // tiles.block_n),
        [full(x.shape), full(w_a.shape), full(w_b.shape)],
        full((m, width)),
        jax.ShapeDtypeStruct((m, width), x.dtype),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )(x, w_a.astype(x.dtype), w_b.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _swiglu_up(x, w_a, w_b, interpret, tiles):
    return _pallas(x.reshape(-1, x.shape[-1]), w_a, w_b, interpret, tiles).reshape(
        *x.shape[:-1], w_a.shape[1]
    )


def _swiglu_up_fwd(x, w_a, w_b, interpret, tiles):
    return _swiglu_up(x, w_a, w_b, interpret, tiles), (x, w_a, w_b)


def _swiglu_up_bwd(interpret, tiles, residuals, dh):
    del interpret, tiles
    return jax.vjp(swiglu_up_reference, *residuals)[1](dh)


_swiglu_up.defvjp(_swiglu_up_fwd, _swiglu_up_bwd)


def supports(d, width, dtype, tiles=TILES):
    """Whether the kernel takes D = d, I = width and dtype (else `swiglu_up` raises for pallas)."""
    return width % tiles.block_n == 0 and d >= 1 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float32)


def swiglu_up(x, w_a, w_b, *, impl="auto", interpret=False, tiles=None):
    """h = SiLU(x @ w_a) * (x @ w_b), differentiable; see the module docstring.

    Args:
      x: [..., D] in the compute dtype (bfloat16 or float32 for the kernel).
      w_a, w_b: [D, I] (cast to x's dtype); I a multiple of the tiles' block_n for the kernel.
      impl: "reference" (XLA), "pallas" (the kernel; a GPU, or `interpret`), or "auto" (pallas on a
        GPU where `supports`, else reference).
      interpret: run the kernel in Pallas interpret mode (CPU tests).
      tiles: the kernel's `Tiles` (None: TILES).

    Returns:
      h: [..., I] in x.dtype.

    Raises:
      ValueError: on mismatched shapes, an unknown impl, or a shape or dtype the kernel does not
        take with impl="pallas".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if w_a.ndim != 2 or w_a.shape != w_b.shape or w_a.shape[0] != x.shape[-1]:
        raise ValueError(
            f"need x [..., D] and w_a, w_b [D, I] alike; got {x.shape=}, {w_a.shape=}, {w_b.shape=}"
        )
    d, width = w_a.shape
    tiles = tiles or TILES
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu" or interpret
        impl = "pallas" if on_gpu and supports(d, width, x.dtype, tiles) else "reference"
    if impl == "reference":
        return swiglu_up_reference(x, w_a, w_b)
    if not supports(d, width, x.dtype, tiles):
        raise ValueError(
            f"the swiglu_up kernel needs I a multiple of {tiles.block_n} and bfloat16 or float32 "
            f"x; got I={width}, x.dtype={x.dtype}"
        )
    if not interpret and jax.default_backend() != "gpu":
        raise ValueError("impl='pallas' needs a GPU; pass interpret=True or impl='reference'")
    run = lambda x, w_a, w_b: _swiglu_up(x, w_a, w_b, interpret, tiles)
    return _per_batch_shard(run, x, replicated=(w_a, w_b))
