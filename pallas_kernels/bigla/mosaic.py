"""BiGLA forward as a Pallas Mosaic GPU kernel for Hopper (sm_90): warpgroup MMA and TMA.

The chunk-parallel forward of `pallas.py`'s long plan (docs/kernel.md, "Chunked form"), written
for `jax.experimental.pallas.mosaic_gpu` because Pallas's Triton lowering is deprecated since
JAX 0.11. One CUDA block (one warpgroup, 128 threads) per (chunk of C = 64 rows, b, h):

  o = ½ [ (A_f + A_b) v  +  (q ⊙ e^{G_f}) S_f,in  +  (q ⊙ e^{G_b}) S_b,in ]

with G the in-chunk inclusive cumsum of each direction's gate (reverse for the backward one) and
S_in the states entering the chunk. The kernel reads q, k, v (bf16), G_f, G_b (fp32), the G rows
of every 16-row sub-block's middle row (fp32) and S_f,in, S_b,in (bf16, transposed: [V, K]) by
TMA, computes the decay exponentials and masks in registers and all products on the tensor cores
(wgmma, bf16 operands, fp32 accumulators).

Scores with per-16-row references. wgmma tiles have 64 rows, but a chunk-wide reference row
overflows fp32 (e^{64 |g|}) for gates below about -1.4 per token. So, as the Triton kernel's fast
diagonal, every query sub-block i (rows 16i..16i+15) gets its middle row m_i as reference:
  A_f[t, s] = Σ_d (q_td e^{G_td - G_{m_i}d}) (k_sd e^{G_{m_i}d - G_sd}),   t in sub-block i,
both factors bounded by e^{8 |g|max} for keys s up to the end of sub-block i (keys of later
sub-blocks are zeroed through a `where` on the exponent before the exp). The four sub-blocks are
four wgmmas into one [64, 64] accumulator, the LHS rows of the other sub-blocks zeroed; then
`where(s <= t)` keeps the causal part (A_b: the mirror image with `s >= t`). Exact products,
finite while every gate is at least -10 per token: one factor reaches |q| e^{8 |g|}, and fp32
and bf16 end at e^{88.7} (at -11 the emulation already gives inf). The same range as
`pallas.KernelParams(exact_diagonal=False)`, ViG's default.

Inputs are prepared in XLA: padding to a multiple of C (zeros: neutral in both directions), the
in-chunk gate cumsums (Mosaic GPU has no cumsum; a 0/1 matmul would be tf32) and their middle
rows. The states entering every chunk come from a second Mosaic GPU kernel (`states="mosaic"`:
one block per (b, h) walks the chunks, the state kept transposed so its update is a wgmma with
M = V; V >= 64), from the Triton states kernels (`pallas._states`, the default until the Mosaic
one is timed) or from the XLA scan of `chunked.py`. The backward pass (custom_vjp) is the Triton
one (`pallas._bigla_bwd`) or autodiff of `bigla_chunked` (`backward="xla"`); a Mosaic backward
is future work.

Pallas Mosaic GPU names used (all in jax 0.10.2, where the kernel cross-lowers; upstream marks
the module unstable, so these are what to check on a newer JAX): plgpu.kernel (grid,
grid_names, scratch_types, compiler_params), plgpu.SMEM, plgpu.Barrier, plgpu.TilingTransform,
plgpu.SwizzleTransform, plgpu.copy_gmem_to_smem, plgpu.barrier_wait, plgpu.copy_smem_to_gmem,
plgpu.wait_smem_to_gmem, plgpu.commit_smem, plgpu.wgmma, plgpu.ACC, plgpu.transpose_ref,
plgpu.ACC.init, plgpu.layout_cast, plgpu.Layout.WGMMA (and .reduce), plgpu.broadcasted_iota,
plgpu.CompilerParams, pl.run_scoped, pl.run_state.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Version-sensitive Pallas imports live here only (jax 0.10.2 on CPU, 0.11.2 on the GPU machine).
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

CHUNK = 64  # rows per chunk = wgmma's M (one warpgroup)
SUB = 16  # rows per reference sub-block: the exponent bound is 8 gates (rows 0..8 around row 8)
MID = SUB // 2
K_DIMS = (16, 32, 64)
V_DIMS = (32, 64, 128)
STATES = ("mosaic", "pallas", "xla")
MOSAIC_STATES_MIN_V = 64  # the states kernel's wgmma has M = V
BACKWARDS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class MosaicParams:
    """Settings of `bigla_mosaic` (the single static argument of its custom_vjp).

    states: where the states entering every chunk come from: "mosaic" (`_bigla_states_kernel`,
      one Mosaic GPU block per (b, h) walking all chunks; V >= 64), "pallas" (the Triton states
      kernels of `pallas.py`, sequential or in spans as there) or "xla" (the `lax.scan` of
      `chunked.py`).
    backward: "pallas" (the Triton backward kernels) or "xla" (autodiff of `bigla_chunked`).
    states_span: chunks per states program, as `pallas.KernelParams.states_span` (None: spans only
      when B * H is below `pallas.STATE_PROGRAMS`), for the "mosaic" and "pallas" states.
    emulate: run the kernel bodies (`_fwd_chunk`, `_state_step`) in plain jnp instead of the
      Mosaic GPU kernels, and the Triton kernels in Pallas interpret mode, on any backend: CPU
      tests of the arithmetic and of the states' layout; says nothing about the Mosaic lowering.
    """

    states: str = "pallas"
    backward: str = "pallas"
    states_span: int | None = None
    emulate: bool = False


def supports(K, V):
    """Whether the kernel takes head dims K, V (see `_check`)."""
    return K in K_DIMS and V in V_DIMS and V >= K


def _check(q, k, v, gf, gb, params):
    if q.ndim != 4 or v.ndim != 4:
        raise ValueError(f"mosaic BiGLA needs [B, N, H, d] inputs; got {q.shape=}, {v.shape=}")
    B, N, H, K = q.shape
    V = v.shape[-1]
    for name, x in (("k", k), ("gf", gf), ("gb", gb)):
        if x.shape != q.shape:
            raise ValueError(f"{name}.shape={x.shape} must equal {q.shape=}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, N, H, V] with B, N, H of q; got {v.shape=}, {q.shape=}")
    if not supports(K, V):
        raise ValueError(f"mosaic BiGLA needs K in {K_DIMS}, V in {V_DIMS}, V >= K; got {K=}, {V=}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != jnp.bfloat16:
            raise ValueError(f"mosaic BiGLA needs bfloat16 q, k, v; got {name}.dtype={x.dtype}")
    if N < 1:
        raise ValueError(f"need at least one token, got {q.shape=}")
    if params.states not in STATES:
        raise ValueError(f"states={params.states!r} is not one of {STATES}")
    if params.states == "mosaic" and V < MOSAIC_STATES_MIN_V:
        raise ValueError(f"states='mosaic' needs V >= {MOSAIC_STATES_MIN_V}; got {V=}")
    span = params.states_span
    if span is not None and not (isinstance(span, int) and span >= 0):
        raise ValueError(f"states_span={span!r} must be None or an integer >= 0")
    if params.backward not in BACKWARDS:
        raise ValueError(f"backward={params.backward!r} is not one of {BACKWARDS}")


def _smem_transforms(minor, itemsize=2, swizzle_max=128):
    """Tiling + swizzle of an SMEM tile whose minor dimension is `minor` elements of `itemsize`
    bytes: the swizzle spans min(minor * itemsize, swizzle_max) bytes (32, 64 or 128), as wgmma
    and the bank-conflict-free register loads want."""
    swizzle = min(minor * itemsize, swizzle_max)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


# ----------------------------------------------------------------------------------------------
# Chunk kernel. Its body `_fwd_chunk` (like the states kernel's `_state_step` below) is written
# once against a small set of ops: `_KernelOps` inside the Mosaic GPU kernel (SMEM, wgmma),
# `_EmulatedOps` in plain jnp (`MosaicParams.emulate`), so CPU tests run the body's arithmetic
# (reference rows, masks, exponents, bf16 rounding points).


def _fwd_chunk(ops, q, k, g_f, g_b, m_f, m_b, v, s_f, s_b):
    """o of one chunk of one (b, h), [C, V] fp32.

    q, k, g_f, g_b: [C, K] fp32 (g: the in-chunk inclusive cumsums, g_b the reverse one);
    m_f, m_b: the cumsums at each sub-block's middle row, [C / SUB, K] (read through `ops.mid`);
    v [C, V] and the transposed states s_f, s_b [V, K]: right-hand operands of the output
    products (through `ops.out`).
    """
    C, K = q.shape
    nsub = C // SUB
    row_block = ops.iota((C, K), 0) // SUB

    def scores(g, m, reverse):
        """This direction's masked scores [C, C] (rows t: queries, columns s: keys)."""
        mids = [ops.mid(m, i, (C, K)) for i in range(nsub)]
        ref = mids[-1]
        for i in reversed(range(nsub - 1)):
            ref = jnp.where(row_block == i, mids[i], ref)
        qh = q * jnp.exp(g - ref)  # |exponent| <= 8 |g|max
        lhs, keys = [], []
        for i in range(nsub):
            lhs.append(jnp.where(row_block == i, qh, 0.0).astype(jnp.bfloat16))
            # Keys of sub-block i and those before it (after it, reverse): exponent <= 7 |g|max;
            # the others get exponent 0 before the exp and are zeroed after it.
            keep = row_block >= i if reverse else row_block <= i
            kh = k * jnp.exp(jnp.where(keep, mids[i] - g, 0.0))
            keys.append(jnp.where(keep, kh, 0.0).astype(jnp.bfloat16))
        a = ops.scores(int(reverse), lhs, keys)
        t, s = ops.iota((C, C), 0), ops.iota((C, C), 1)
        return jnp.where(s >= t if reverse else s <= t, a, 0.0)

    a = scores(g_f, m_f, False) + scores(g_b, m_b, True)  # the diagonal counts in both directions
    q_f = (q * jnp.exp(g_f)).astype(jnp.bfloat16)  # exponents <= 0
    q_b = (q * jnp.exp(g_b)).astype(jnp.bfloat16)
    return 0.5 * ops.out([(a.astype(jnp.bfloat16), v, False), (q_f, s_f, True), (q_b, s_b, True)])


class _KernelOps:
    """`_fwd_chunk`'s ops inside the Mosaic GPU kernel; kh_smem: [C / SUB, C, K] bf16, the
    decayed keys of each reference sub-block (wgmma's right-hand operands), one direction after
    the other: reading the first direction's accumulator waits for its wgmmas, so the second
    may overwrite the keys (16 KB less SMEM at K 32: 3 blocks per SM instead of 2)."""

    layout = plgpu.Layout.WGMMA

    def __init__(self, kh_smem):
        self.kh_smem = kh_smem

    def iota(self, shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.layout)

    def mid(self, m_smem, i, shape):
        m = plgpu.layout_cast(m_smem[i], self.layout.reduce(0))  # [K]
        return lax.broadcast_in_dim(m, shape, [1])

    def scores(self, direction, lhs, keys):
        del direction  # one buffer, see the class docstring
        kh = self.kh_smem
        for i, x in enumerate(keys):
            kh[i] = x
        plgpu.commit_smem()  # the stores above must be visible to the tensor cores

        def body(acc_ref):
            for i, x in enumerate(lhs):
                plgpu.wgmma(acc_ref, x, plgpu.transpose_ref(kh.at[i], (1, 0)))
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC((lhs[0].shape[0],) * 2, jnp.float32))

    def out(self, terms):
        """sum of a @ b (b transposed where flagged), terms (a [M, X] bf16, b SMEM, flag)."""

        def body(acc_ref):
            for a, b_smem, transposed in terms:
                plgpu.wgmma(
                    acc_ref, a, plgpu.transpose_ref(b_smem, (1, 0)) if transposed else b_smem
                )
            return acc_ref[...]

        shape = (terms[0][0].shape[0], terms[0][1].shape[-1])
        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


class _EmulatedOps:
    """`_fwd_chunk`'s ops in plain jnp: bf16 operands, fp32 products, as the wgmmas."""

    @staticmethod
    def iota(shape, dim):
        return lax.broadcasted_iota(jnp.int32, shape, dim)

    @staticmethod
    def mid(m, i, shape):
        return jnp.broadcast_to(m[i], shape)

    @staticmethod
    def _dot(a, b):
        return jnp.dot(a, b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    def scores(self, direction, lhs, keys):
        return sum(self._dot(x, kh.T) for x, kh in zip(lhs, keys, strict=True))

    def out(self, terms):
        return sum(self._dot(a, b.T if transposed else b) for a, b, transposed in terms)

    @staticmethod
    def row(g, r):
        return g[r]

    def add_vt_k(self, direction, s, v, kh):
        return s + self._dot(v.T.astype(jnp.bfloat16), kh)


def _bigla_fwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    gf_ref,
    gb_ref,
    mf_ref,
    mb_ref,
    sf_ref,
    sb_ref,
    o_ref,
    q_smem,
    k_smem,
    v_smem,
    gf_smem,
    gb_smem,
    mf_smem,
    mb_smem,
    sf_smem,
    sb_smem,
    kh_smem,
    o_smem,
    barrier,
    *,
    V,
):
    """One chunk of one (b, h). Refs in HBM: q, k [B, Np, H, K] bf16, v [B, Np, H, V] bf16,
    gf, gb [B, Np, H, K] fp32 (in-chunk cumsums), mf, mb [B, Np / SUB, H, K] fp32 (the cumsums
    at each sub-block's middle row), sf, sb [B, H, NTp * V, K] bf16 (entering states, transposed), o
    [B, Np, H, V] bf16; then their SMEM tiles (kh_smem: see `_KernelOps`) and 9 TMA barriers."""
    c, b, h = lax.axis_index("c"), lax.axis_index("b"), lax.axis_index("h")
    rows = pl.ds(c * CHUNK, CHUNK)
    nsub = CHUNK // SUB
    copies = (
        (q_ref.at[b, rows, h], q_smem),
        (k_ref.at[b, rows, h], k_smem),
        (v_ref.at[b, rows, h], v_smem),
        (gf_ref.at[b, rows, h], gf_smem),
        (gb_ref.at[b, rows, h], gb_smem),
        (mf_ref.at[b, pl.ds(c * nsub, nsub), h], mf_smem),
        (mb_ref.at[b, pl.ds(c * nsub, nsub), h], mb_smem),
        (sf_ref.at[b, h, pl.ds(c * V, V)], sf_smem),
        (sb_ref.at[b, h, pl.ds(c * V, V)], sb_smem),
    )
    for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, barrier.at[i])
    for i in range(len(copies)):
        plgpu.barrier_wait(barrier.at[i])

    ops = _KernelOps(kh_smem)
    load = lambda ref: plgpu.layout_cast(ref[...], ops.layout).astype(jnp.float32)
    q, k, g_f, g_b = (load(r) for r in (q_smem, k_smem, gf_smem, gb_smem))  # [C, K]
    o = _fwd_chunk(ops, q, k, g_f, g_b, mf_smem, mb_smem, v_smem, sf_smem, sb_smem)
    o_smem[...] = o.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)


def _chunk_call(nt, q, k, v, Gf, Gb, Mf, Mb, Sf, Sb):
    """The Mosaic GPU launch, grid (NT, B, H), NT = nt. Shapes as `_bigla_fwd_kernel`'s refs
    (Np >= NT * C rows; o has Np rows, those past NT * C unwritten)."""
    B, Np, H, K = q.shape
    V = v.shape[-1]
    bf16, f32 = jnp.bfloat16, jnp.float32
    scratch = [
        # Swizzled like wgmma operands, also those only read into registers: their untiled loads
        # in the WGMMA layout have no bank-conflict-free plan.
        plgpu.SMEM((CHUNK, K), bf16, transforms=_smem_transforms(K)),  # q
        plgpu.SMEM((CHUNK, K), bf16, transforms=_smem_transforms(K)),  # k
        plgpu.SMEM((CHUNK, V), bf16, transforms=_smem_transforms(V)),  # v: wgmma RHS
        plgpu.SMEM((CHUNK, K), f32, transforms=_smem_transforms(K, 4)),  # G_f
        plgpu.SMEM((CHUNK, K), f32, transforms=_smem_transforms(K, 4)),  # G_b
        plgpu.SMEM((CHUNK // SUB, K), f32),  # middle rows of G_f
        plgpu.SMEM((CHUNK // SUB, K), f32),  # middle rows of G_b
        # Transposed states [V, K]: wgmma RHS read transposed, as the keys.
        plgpu.SMEM((V, K), bf16, transforms=_smem_transforms(K)),
        plgpu.SMEM((V, K), bf16, transforms=_smem_transforms(K)),
        plgpu.SMEM((CHUNK // SUB, CHUNK, K), bf16, transforms=_smem_transforms(K)),  # keys
        plgpu.SMEM((CHUNK, V), bf16),  # o
        plgpu.Barrier(num_barriers=9),
    ]

    def bigla_mosaic_fwd_chunks(*refs):  # plgpu.kernel names the launch after the body
        _bigla_fwd_kernel(*refs, V=V)

    return plgpu.kernel(
        bigla_mosaic_fwd_chunks,
        out_type=jax.ShapeDtypeStruct((B, Np, H, V), bf16),
        scratch_types=scratch,
        grid=(nt, B, H),
        grid_names=("c", "b", "h"),
        compiler_params=plgpu.CompilerParams(),
    )(q, k, v, Gf, Gb, Mf, Mb, Sf, Sb)


def _emulated_chunks(nt, q, k, v, Gf, Gb, Mf, Mb, Sf, Sb):
    """`_chunk_call` on any backend: `_fwd_chunk` on `_EmulatedOps`, vmapped over (b, chunk, h)
    (o has nt * C rows)."""
    B, Np, H, K = q.shape

    def chunks(x, rows):  # [B, >= nt * rows, H, d] -> [B, nt, H, rows, d]
        return x[:, : nt * rows].reshape(B, nt, rows, H, x.shape[-1]).swapaxes(2, 3)

    def states(s):  # [B, H, NTp * V, K] -> [B, nt, H, V, K]
        return s.reshape(B, H, -1, v.shape[-1], K)[:, :, :nt].swapaxes(1, 2)

    f32 = jnp.float32
    args = [chunks(x.astype(f32), CHUNK) for x in (q, k, Gf, Gb)]
    args += [chunks(Mf, CHUNK // SUB), chunks(Mb, CHUNK // SUB), chunks(v, CHUNK)]
    args += [states(Sf), states(Sb)]
    body = functools.partial(_fwd_chunk, _EmulatedOps())
    for _ in range(3):
        body = jax.vmap(body)
    o = body(*args).astype(v.dtype)  # [B, nt, H, C, V]
    return o.swapaxes(2, 3).reshape(B, nt * CHUNK, H, -1)


# ----------------------------------------------------------------------------------------------
# States kernel (states="mosaic"): one block per (b, h) walks the chunks, both directions in the
# same loop, the state [K, V] kept transposed (S^T [V, K]) so that its update v^T k^ is a wgmma
# with M = V (64 rows at least; hence V >= 64).


def _state_step(ops, s, k, g, v, direction):
    """The transposed state after one chunk: s [V, K] fp32 entering it; k, g [C, K] fp32 (g this
    direction's in-chunk cumsum); v [C, V] (through `ops.add_vt_k`); direction 0 forward, 1
    backward. The chunk's decay is e^T with T = g at the chunk's exit (last row forward, first
    backward), the keys decay to the exit by e^{T - g}: every exponent <= 0."""
    C, K = k.shape
    total = ops.row(g, C - 1 if direction == 0 else 0)  # [K]
    kh = k * jnp.exp(lax.broadcast_in_dim(total, (C, K), [1]) - g)
    decayed = s * jnp.exp(lax.broadcast_in_dim(total, s.shape, [1]))
    return ops.add_vt_k(direction, decayed, v, kh.astype(jnp.bfloat16))


class _StatesKernelOps:
    """`_state_step`'s ops inside the Mosaic GPU states kernel; kh_smem [2, C, K] bf16."""

    layout = plgpu.Layout.WGMMA

    def __init__(self, kh_smem):
        self.kh_smem = kh_smem

    def row(self, g, r):  # g[r] as a [K] vector (a masked sum over the rows: no row gather)
        rows = plgpu.broadcasted_iota(jnp.int32, g.shape, 0, layout=self.layout)
        return jnp.sum(jnp.where(rows == r, g, 0.0), axis=0)

    def add_vt_k(self, direction, s, v_smem, kh):
        kh_smem = self.kh_smem.at[direction]
        kh_smem[...] = kh
        plgpu.commit_smem()  # also a warpgroup barrier: every read of this step's tiles is done

        def body(acc_ref):
            plgpu.wgmma(acc_ref, plgpu.transpose_ref(v_smem, (1, 0)), kh_smem)
            return acc_ref[...]

        # A zero accumulator and s added after it: JAX 0.11's Mosaic GPU lowering of run_state
        # over an accumulator initialised from s fails (a literal where it expects a value).
        return s + pl.run_scoped(body, plgpu.ACC(s.shape, jnp.float32))


def _bigla_states_kernel(*refs, span, summary, has_init):
    """One span of `span` chunks of one (b, h); grid (NS, B, H).

    Refs: k [B, NTp * C, H, K], v [B, NTp * C, H, V] bf16, gf, gb [B, NTp * C, H, K] fp32
    (in-chunk cumsums); with `has_init` the transposed states entering every span, [B, H,
    NS * V, K] fp32 each; then the two outputs: the transposed states entering every chunk,
    [B, H, NTp * V, K] bf16 each, or with `summary` the states leaving every span (started from
    zero: its own contribution), [B, H, NS * V, K] fp32 each; then the SMEM tiles ([2, ...], one
    per direction) and the TMA barriers. Step `it` handles the span's chunk `it` forward and
    chunk `span - 1 - it` backward.
    """
    nin = 6 if has_init else 4
    (k_ref, v_ref, gf_ref, gb_ref), init_refs = refs[:4], refs[4:nin]
    out_refs, scratch = refs[nin : nin + 2], refs[nin + 2 :]
    k_smem, v_smem, g_smem, kh_smem, st_smem, *init_smem, barrier = scratch
    sp, b, h = lax.axis_index("s"), lax.axis_index("b"), lax.axis_index("h")
    V, K = st_smem.shape[1:]
    ops = _StatesKernelOps(kh_smem)
    load = lambda ref: plgpu.layout_cast(ref[...], ops.layout).astype(jnp.float32)

    def step(it, states):
        chunks = (sp * span + it, sp * span + span - 1 - it)
        for d, g_ref in enumerate((gf_ref, gb_ref)):
            rows = pl.ds(chunks[d] * CHUNK, CHUNK)
            for j, (src, dst) in enumerate(((k_ref, k_smem), (v_ref, v_smem), (g_ref, g_smem))):
                plgpu.copy_gmem_to_smem(src.at[b, rows, h], dst.at[d], barrier.at[3 * d + j])
        if not summary:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last step's stores read st_smem
            for d in range(2):
                st_smem.at[d][...] = states[d].astype(st_smem.dtype)
            plgpu.commit_smem()
            for d, s_ref in enumerate(out_refs):
                plgpu.copy_smem_to_gmem(st_smem.at[d], s_ref.at[b, h, pl.ds(chunks[d] * V, V)])
        new = []
        for d in range(2):
            for j in range(3):
                plgpu.barrier_wait(barrier.at[3 * d + j])
            k, g = load(k_smem.at[d]), load(g_smem.at[d])
            new.append(_state_step(ops, states[d], k, g, v_smem.at[d], d))
        return tuple(new)

    span_rows = pl.ds(sp * V, V)
    if has_init:
        (init_smem,) = init_smem
        for d, ref in enumerate(init_refs):
            plgpu.copy_gmem_to_smem(ref.at[b, h, span_rows], init_smem.at[d], barrier.at[6 + d])
        for d in range(2):
            plgpu.barrier_wait(barrier.at[6 + d])
        states = tuple(load(init_smem.at[d]) for d in range(2))
    else:
        states = (plgpu.layout_cast(jnp.zeros((V, K), jnp.float32), ops.layout),) * 2
    final = lax.fori_loop(0, span, step, states)
    if summary:
        for d in range(2):
            st_smem.at[d][...] = final[d]
        plgpu.commit_smem()
        for d, s_ref in enumerate(out_refs):
            plgpu.copy_smem_to_gmem(st_smem.at[d], s_ref.at[b, h, span_rows])
    plgpu.wait_smem_to_gmem(0)


def _states_launch(k, v, Gf, Gb, span, summary=False, init=None):
    """One Mosaic GPU states launch, grid (NS, B, H) with NS = NTp / span (see
    `_bigla_states_kernel`). Returns (S_f^T, S_b^T) entering every chunk, [B, H, NTp * V, K]
    bf16, or with `summary` leaving every span, [B, H, NS * V, K] fp32."""
    B, n_pad, H, K = k.shape
    V = v.shape[-1]
    ns = n_pad // CHUNK // span
    bf16, f32 = jnp.bfloat16, jnp.float32
    out_dtype = f32 if summary else bf16
    out = jax.ShapeDtypeStruct((B, H, (ns if summary else ns * span) * V, K), out_dtype)
    scratch = [
        plgpu.SMEM((2, CHUNK, K), bf16, transforms=_smem_transforms(K)),  # k
        # v is the wgmma LHS read transposed: its swizzle must equal the RHS's (2K bytes).
        plgpu.SMEM((2, CHUNK, V), bf16, transforms=_smem_transforms(V, swizzle_max=2 * K)),
        plgpu.SMEM((2, CHUNK, K), f32, transforms=_smem_transforms(K, 4)),  # in-chunk cumsums
        plgpu.SMEM((2, CHUNK, K), bf16, transforms=_smem_transforms(K)),  # decayed keys
        # States written out: entering every chunk (bf16) or leaving the span (fp32).
        plgpu.SMEM((2, V, K), out_dtype, transforms=_smem_transforms(K, out.dtype.itemsize)),
    ]
    if init is not None:  # states entering the span
        scratch.append(plgpu.SMEM((2, V, K), f32, transforms=_smem_transforms(K, 4)))
    scratch.append(plgpu.Barrier(num_barriers=8 if init is not None else 6))
    kernel = functools.partial(
        _bigla_states_kernel, span=span, summary=summary, has_init=init is not None
    )

    def bigla_mosaic_fwd_states(*refs):  # plgpu.kernel names the launch after the body
        kernel(*refs)

    return plgpu.kernel(
        bigla_mosaic_fwd_states,
        out_type=(out, out),
        scratch_types=scratch,
        grid=(ns, B, H),
        grid_names=("s", "b", "h"),
        compiler_params=plgpu.CompilerParams(),
    )(k, v, Gf, Gb, *(init or ()))


def _emulated_states_launch(k, v, Gf, Gb, span, summary=False, init=None):
    """`_states_launch` on any backend: `_state_step` on `_EmulatedOps` in a `lax.scan`."""
    B, n_pad, H, K = k.shape
    V = v.shape[-1]
    ns = n_pad // CHUNK // span
    f32 = jnp.float32

    def spans(x):  # [B, NTp * C, H, d] -> [B, H, NS, span, C, d]
        return x.reshape(B, ns, span, CHUNK, H, x.shape[-1]).transpose(0, 4, 1, 2, 3, 5)

    ops = _EmulatedOps()

    def walk(k, v, g, s, direction):  # one span of one (b, h): [span, C, d], s [V, K]
        def step(s, xs):
            return _state_step(ops, s, *xs, direction), s

        return lax.scan(step, s, (k, g, v), reverse=direction == 1)  # (leaving, entering)

    for _ in range(3):
        walk = jax.vmap(walk, (0, 0, 0, 0, None))
    if init is None:
        init = (jnp.zeros((B, H, ns * V, K), f32),) * 2
    kc, vc = spans(k.astype(f32)), spans(v)
    out = []
    for d, G in enumerate((Gf, Gb)):
        leaving, entering = walk(kc, vc, spans(G), init[d].reshape(B, H, ns, V, K), d)
        out.append(leaving if summary else entering.astype(jnp.bfloat16))
    return tuple(x.reshape(B, H, -1, K) for x in out)


def _mosaic_states(k, v, Gf, Gb, span, launch):
    """Transposed states entering every chunk from the Mosaic states kernel, [B, H, NTp * V, K]
    bf16 each; k, v, Gf, Gb padded to NTp = NS * span chunks. NS = 1: one launch walks all
    chunks. Else the span plan of `pallas._states`: a summary launch gives every span's own
    leaving states, `pallas._scan_spans` (in XLA) the states entering every span, and a second
    launch walks each span from them (span 1: the scan already gives every chunk's states).
    launch: `_states_launch`, or `_emulated_states_launch`."""
    from pallas_kernels.bigla import pallas

    B, n_pad, H, K = k.shape
    V = v.shape[-1]
    ns = n_pad // CHUNK // span
    if ns == 1:
        return launch(k, v, Gf, Gb, span)
    owns = launch(k, v, Gf, Gb, span, summary=True)  # [B, H, NS * V, K] fp32 each
    owns = [x.reshape(B, H, ns, V, K).swapaxes(-1, -2) for x in owns]  # [B, H, NS, K, V]
    # Log decay of a whole span: the sum of its chunks' exit rows (last forward, first backward).
    exits = [G.reshape(B, ns, span, CHUNK, H, K)[:, :, :, r] for G, r in ((Gf, -1), (Gb, 0))]
    totals = [x.sum(axis=2).transpose(0, 2, 1, 3) for x in exits]  # [B, H, NS, K]
    entering = pallas._scan_spans(totals, owns, (False, True), "xla")
    init = [x.swapaxes(-1, -2).reshape(B, H, ns * V, K) for x in entering]
    if span == 1:
        return tuple(x.astype(jnp.bfloat16) for x in init)
    return launch(k, v, Gf, Gb, span, init=init)


# ----------------------------------------------------------------------------------------------
# XLA preparation and the public entry.


def _pad(x, n_pad):
    return jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1]), (0, 0), (0, 0)))


def _in_chunk_cumsums(g, n_pad):
    """[B, N, H, K] gate -> (inclusive, reverse-inclusive) in-chunk cumsums, [B, Np, H, K] fp32."""
    B, _, H, K = g.shape
    g = _pad(g.astype(jnp.float32), n_pad).reshape(B, n_pad // CHUNK, CHUNK, H, K)
    fwd = jnp.cumsum(g, axis=2)
    bwd = lax.cumsum(g, axis=2, reverse=True)
    return fwd.reshape(B, n_pad, H, K), bwd.reshape(B, n_pad, H, K)


def _mids(G):
    """[B, Np, H, K] -> the rows at each sub-block's middle, [B, Np / SUB, H, K]."""
    B, n_pad, H, K = G.shape
    return G.reshape(B, n_pad // SUB, SUB, H, K)[:, :, MID]


def _triton_params(params):
    """The Triton kernels' settings: their defaults at our chunk size and states_span, in Pallas
    interpret mode when the body is emulated (so CPU tests also run the states and backward this
    path uses)."""
    from pallas_kernels.bigla import pallas

    return pallas.KernelParams(
        chunk=CHUNK, states_span=params.states_span, interpret=params.emulate
    )


def _mosaic_span(B, H, N, params):
    """Chunks per Mosaic states block: all NT (one block per (b, h)) unless B * H alone is too few
    blocks; then spans as the Triton states plan (`pallas._states_span`, same states_span)."""
    from pallas_kernels.bigla import pallas

    nt = math.ceil(N / CHUNK)
    return pallas._states_span(B, H, nt, _triton_params(params)) or nt


def _entering_states(inputs, padded, params):
    """Transposed states entering every chunk, (S_f^T, S_b^T), [B, H, NTp * V, K] bf16 each
    (NTp >= NT). inputs: (k, v, gf, gb) as given; padded: k, v padded to Np rows and the in-chunk
    cumsums Gf, Gb (what the Mosaic states kernel reads)."""
    k, v, gf, gb = inputs
    B, _, H, K = k.shape
    V = v.shape[-1]
    if params.states == "mosaic":
        launch = _emulated_states_launch if params.emulate else _states_launch
        return _mosaic_states(*padded, _mosaic_span(B, H, k.shape[1], params), launch)
    if params.states == "pallas":
        from pallas_kernels.bigla import pallas

        inputs = (k, v, gf.astype(jnp.float32), gb.astype(jnp.float32))
        sf, sb = pallas._states(inputs, _triton_params(params), False)  # [B, H, NTp * K, V]
    else:
        from pallas_kernels.bigla import chunked

        f32 = jnp.float32
        kc, vc, gfc, gbc = (chunked._to_chunks(x, CHUNK, f32) for x in (k, v, gf, gb))
        Gf, Gb = jnp.cumsum(gfc, axis=3), lax.cumsum(gbc, axis=3, reverse=True)
        decay = jnp.exp(jnp.stack([Gf[..., -1, :], Gb[..., 0, :]]))  # [2, B, NT, H, K]
        k_end = jnp.stack([kc * jnp.exp(Gf[..., -1:, :] - Gf), kc * jnp.exp(Gb[..., :1, :] - Gb)])
        u = jnp.einsum("d...ck,...cv->d...kv", k_end, vc, precision=lax.Precision.HIGHEST)
        s_in = chunked._states_in(decay, u)  # [2, B, NT, H, K, V]
        s_in = s_in.transpose(0, 1, 3, 2, 4, 5).reshape(2, B, H, -1, V)
        sf, sb = s_in[0], s_in[1]
    transpose = lambda x: x.reshape(B, H, -1, K, V).swapaxes(-1, -2).reshape(B, H, -1, K)
    return transpose(sf).astype(jnp.bfloat16), transpose(sb).astype(jnp.bfloat16)


def _bigla_fwd(q, k, v, gf, gb, params):
    B, N, H, K = q.shape
    nt = math.ceil(N / CHUNK)
    # Whole chunks; with Mosaic states in spans, whole spans (their kernel reads every chunk).
    span = _mosaic_span(B, H, N, params) if params.states == "mosaic" else 1
    n_pad = math.ceil(nt / span) * span * CHUNK
    Gf, _ = _in_chunk_cumsums(gf, n_pad)
    _, Gb = _in_chunk_cumsums(gb, n_pad)
    qp, kp, vp = (_pad(x, n_pad) for x in (q, k, v))
    sf, sb = _entering_states((k, v, gf, gb), (kp, vp, Gf, Gb), params)
    chunk_call = _emulated_chunks if params.emulate else _chunk_call
    o = chunk_call(nt, qp, kp, vp, Gf, Gb, _mids(Gf), _mids(Gb), sf, sb)
    return o[:, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _bigla(q, k, v, gf, gb, params):
    return _bigla_fwd(q, k, v, gf, gb, params)


def _bigla_vjp_fwd(q, k, v, gf, gb, params):
    return _bigla_fwd(q, k, v, gf, gb, params), (q, k, v, gf, gb)


def _bigla_vjp_bwd(params, residuals, do):
    if params.backward == "pallas":
        from pallas_kernels.bigla import pallas

        return tuple(pallas._bigla_bwd(*residuals, do, _triton_params(params), None))
    from pallas_kernels.bigla.chunked import bigla_chunked

    _, vjp = jax.vjp(functools.partial(bigla_chunked, chunk_size=CHUNK), *residuals)
    return vjp(do)


_bigla.defvjp(_bigla_vjp_fwd, _bigla_vjp_bwd)


def bigla_mosaic(q, k, v, gf, gb, *, params=MosaicParams()):
    """BiGLA o = (o_fwd + o_bwd) / 2 with the forward in a Mosaic GPU kernel (sm_90).

    Args:
      q, k: [B, N, H, K] bfloat16, K in (16, 32, 64).
      v: [B, N, H, V] bfloat16, V in (32, 64, 128), V >= K.
      gf, gb: [B, N, H, K] log-space gates, any float dtype (computed in float32); supported
        range: every gate in [-10, 0] (see the module docstring).
      params: `MosaicParams` (where the states and the backward pass come from).

    Returns:
      o: [B, N, H, V] bfloat16, accumulated in float32. Differentiable (custom_vjp).

    Raises:
      ValueError: on unsupported shapes, dtypes or params.
    """
    _check(q, k, v, gf, gb, params)
    return _bigla(q, k, v, gf, gb, params)
