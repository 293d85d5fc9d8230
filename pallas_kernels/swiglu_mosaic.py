"""SwiGLU's up projection and gate, h = SiLU(x W_a) * (x W_b), as one Mosaic GPU kernel (Hopper).

Experimental, inference only, not yet run on a GPU (it cross-lowers for CUDA on CPU). In the
models' forward pass XLA runs the up projection as cuBLAS matmuls writing a and b ([M, I] each,
bf16) and then a bytes-bound pass reading both and writing h: on an H200 that pass is 0.51 ms of
ViG-S's 6.1 ms inference step at 224² and 0.34 of ViG-T's 4.2 at 1024² (docs/benchmarks.md).
Here both products of a tile stay in registers and only h is written. A Pallas-Triton version
reached 340 TFLOP/s and lost to cuBLAS plus the gate pass; this one uses warpgroup MMA fed by TMA
in a warp-specialized pipeline (one memory warpgroup, two compute warpgroups).

One CUDA block per (128 rows of x, 128 columns of h): each compute warpgroup owns 64 rows and
accumulates a and b for them ([64, 128] fp32 each) over D in steps of 64. The block reads its
128 columns of W_a and of W_b as one [64, 256] tile per step: the wrapper interleaves W_up's two
halves in blocks of 128 columns (`interleave`), a 1.5 MB reshuffle of the weights per call.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Version-sensitive Pallas imports live here only.
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE_M = 64  # rows per compute warpgroup (wgmma M)
ROWS = 2 * TILE_M  # rows per block
TILE_N = 128  # columns of h (and of each of a, b) per block
TILE_K = 64  # depth per pipeline step: 128 bytes of bf16, one swizzle span
STAGES = 3  # pipeline steps in flight: 3 x 48 KB of SMEM, plus 32 KB for h


def supports(D: int, hidden: int) -> bool:
    """Whether the kernel takes input width D and hidden width I (multiples of its tiles)."""
    return D % TILE_K == 0 and hidden % TILE_N == 0 and D > 0 and hidden > 0


def interleave(w_up: jax.Array) -> jax.Array:
    """[D, 2I] = [W_a | W_b] -> [D, 2I] whose column block j (2 * TILE_N wide) is W_a's block j
    followed by W_b's block j: one block's RHS tile."""
    D, two_i = w_up.shape
    blocks = two_i // 2 // TILE_N
    return w_up.reshape(D, 2, blocks, TILE_N).transpose(0, 2, 1, 3).reshape(D, two_i)


def _transforms(minor, itemsize=2):
    swizzle = min(minor * itemsize, 128)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _silu_mul(a, b):
    """SiLU(a) * b in float32 (a / (1 + e^-a): exp and a division, no logistic primitive)."""
    return a / (1.0 + jnp.exp(-a)) * b


def _kernel(x_gmem, w_gmem, h_gmem, h_smem, *, k_steps):
    m, n, wg = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("wg")
    block_rows = pl.ds(m * ROWS, ROWS)
    wg_rows = pl.ds(wg * TILE_M, TILE_M)

    def compute_context(run_pipeline):
        @functools.partial(
            pl.run_scoped,
            acc_a=plgpu.ACC((TILE_M, TILE_N), jnp.float32),
            acc_b=plgpu.ACC((TILE_M, TILE_N), jnp.float32),
        )
        def _scope(acc_a, acc_b):
            run_pipeline((acc_a, acc_b))
            h_smem.at[wg][...] = _silu_mul(acc_a[...], acc_b[...]).astype(h_smem.dtype)
            plgpu.commit_smem()
            out = h_gmem.at[block_rows, pl.ds(n * TILE_N, TILE_N)].at[wg_rows]
            plgpu.copy_smem_to_gmem(h_smem.at[wg], out)
            plgpu.wait_smem_to_gmem(0)

    def mma(_, x_smem, w_smem, carry):
        acc_a, acc_b = carry
        plgpu.wgmma(acc_a, x_smem.at[wg_rows], w_smem.at[:, pl.ds(0, TILE_N)])
        plgpu.wgmma(acc_b, x_smem.at[wg_rows], w_smem.at[:, pl.ds(TILE_N, TILE_N)])
        plgpu.wgmma_wait(0)
        return carry

    pipeline = plgpu.emit_pipeline_warp_specialized(
        mma,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec(
                (ROWS, TILE_K), lambda k: (0, k), transforms=_transforms(TILE_K),
                memory_space=plgpu.SMEM,
            ),
            plgpu.BlockSpec(
                (TILE_K, 2 * TILE_N), lambda k: (k, 0), transforms=_transforms(TILE_N),
                memory_space=plgpu.SMEM,
            ),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=STAGES,
        compute_context=compute_context,
    )  # fmt: skip
    pipeline(x_gmem.at[block_rows, :], w_gmem.at[:, pl.ds(n * 2 * TILE_N, 2 * TILE_N)])


def swiglu_up(x: jax.Array, w_up: jax.Array) -> jax.Array:
    """h = SiLU(x @ W_a) * (x @ W_b) for W_up = [W_a | W_b] ([D, 2I]); x [..., D] -> h [..., I].

    bf16 operands (x and W_up are cast), float32 accumulation, h rounded once to bf16. Not
    differentiable (inference). Rows are padded to a multiple of 128 inside.

    Raises:
      ValueError: D not a multiple of 64 or I of 128, or W_up not [D, 2I].
    """
    D = x.shape[-1]
    if w_up.ndim != 2 or w_up.shape[0] != D or w_up.shape[1] % 2:
        raise ValueError(f"w_up must be [D, 2I] with D = x.shape[-1] = {D}; got {w_up.shape}")
    hidden = w_up.shape[1] // 2
    if not supports(D, hidden):
        raise ValueError(
            f"swiglu_up needs D a multiple of {TILE_K} and I of {TILE_N}; got D={D}, I={hidden}"
        )
    lead = x.shape[:-1]
    rows = x.reshape(-1, D).astype(jnp.bfloat16)
    M = rows.shape[0]
    padded = -(-M // ROWS) * ROWS
    if padded != M:
        rows = jnp.pad(rows, ((0, padded - M), (0, 0)))
    h_smem = plgpu.SMEM((2, TILE_M, TILE_N), jnp.bfloat16, transforms=_transforms(TILE_N))

    def swiglu_up_mosaic(*refs):  # plgpu.kernel names the launch after the body
        _kernel(*refs, k_steps=D // TILE_K)

    h = plgpu.kernel(
        swiglu_up_mosaic,
        out_type=jax.ShapeDtypeStruct((padded, hidden), jnp.bfloat16),
        scratch_types=[h_smem],
        grid=(padded // ROWS, hidden // TILE_N),
        grid_names=("m", "n"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
    )(rows, interleave(w_up.astype(jnp.bfloat16)))
    return h[:M].reshape(*lead, hidden)


def swiglu_up_reference(x: jax.Array, w_up: jax.Array) -> jax.Array:
    """The same in XLA: bf16 operands, float32 products and gate, h rounded once to bf16."""
    hidden = w_up.shape[1] // 2
    f32 = jnp.float32
    w = w_up.astype(jnp.bfloat16)
    a, b = (
        jnp.dot(x.astype(jnp.bfloat16), w[:, s], preferred_element_type=f32)
        for s in (slice(0, hidden), slice(hidden, None))
    )
    return _silu_mul(a, b).astype(jnp.bfloat16)


def swiglu_up_emulated(x: jax.Array, w_up: jax.Array) -> jax.Array:
    """The kernel's blocking in plain jnp on any backend: the interleaved weights read as the
    blocks read them (block j's a and b from its [D, 2 * TILE_N] tile), float32 accumulation.
    CPU tests of the weight layout; says nothing about the Mosaic lowering."""
    D, hidden = x.shape[-1], w_up.shape[1] // 2
    w = interleave(w_up.astype(jnp.bfloat16)).reshape(D, hidden // TILE_N, 2, TILE_N)
    acc = jnp.einsum(
        "md,djst->mjst", x.reshape(-1, D).astype(jnp.bfloat16), w,
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    h = _silu_mul(acc[:, :, 0], acc[:, :, 1]).astype(jnp.bfloat16)  # [M, blocks, TILE_N]
    return h.reshape(*x.shape[:-1], hidden)
