"""Fused Pallas (Triton) BiGLA kernel, forward and backward (docs/kernel.md).

Both directions run in the same kernels, reading q, k, v, gf, gb in their natural [B, N, H, d]
layout. Per (b, h) the sequence is cut into chunks of BT rows (states are kept per chunk) and every
chunk into sub-blocks of BC = 16 rows, the smallest size a Triton dot accepts. Inside a chunk each
direction is a recurrence over its sub-blocks: o_i = (q_i * e^X) S_i + D_i v_i. All state and
off-diagonal exponents are <= 0. The 16 x 16 diagonal block D_i is either exact (one masked
[BC, BC, K] exponential, masked with `where` before the exp, never an exp times a 0/1 mask) or, by
default, two dots around the block's middle row (measured 5x faster forward; finite while gates stay
above about -11 per token, i.e. logits above about -176 for ViG's log_sigmoid(x) / 16).

Two launch plans, chosen by `_use_short_path`:
  short  NT = ceil(N / BT) <= params.short_max_chunks: one program per (b, h) with the chunk loop
         unrolled in Python; a right-to-left pass builds the backward states, a left-to-right pass
         carries the forward state and writes the outputs (states never touch HBM).
  long   states kernels write every chunk's entering states (fp32) to HBM; a chunk kernel with
         grid (NT, B, H) then works on all chunks in parallel. The states come from one program
         per (b, h) walking all chunks with `fori_loop` (sequential), or, when B * H alone cannot
         fill the GPU (long N, small batch), from spans of `states_span` chunks: a summary launch
         (grid (NS, B, H)) gives each span's own leaving states and gate totals, `_scan_spans`
         (a small Pallas walk over the NS spans, or beyond 256 spans a scan in XLA) the states
         entering every span, and a second launch walks each span from them. By default
         (`sub_blocks`) the chunk kernels run one program per 16-row sub-block, which carries its
         chunk's states through the sub-blocks before (and after) it; else one program per chunk.
The backward pass recomputes the states (residuals are the inputs only) plus the two adjoint states
and produces dq, dk, dv, dgf, dgb in one chunk kernel per plan.
`bigla_pallas_logits` runs the same kernels on gate logits: every gate load applies
log_sigmoid(x) / normalizer, every gate-gradient store the chain rule (`_Logits`, `_LogitGrads`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Version-sensitive Pallas imports live here only (jax 0.10.2 on CPU, 0.11.2 on the GPU machine).
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

SUB_CHUNK = 16  # Triton dots need every dimension >= 16.
STATES_DTYPES = ("float32", "input")
HEAD_DIMS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """Non-differentiable settings of the kernels (the single static argument of the custom_vjp).

    chunk: BT, rows per chunk (a multiple of SUB_CHUNK and a power of two). 16, one sub-block
      per chunk (no states carried through a chunk's other sub-blocks): forward + backward 18%
      faster than 32 at ViG-S 224 and 4-5% at ViG-T 1024 and 2048 with saved bf16 states; 64 and
      128 were slower still (H200; notes).
    short_max_chunks: use the one-program-per-(b, h) plan when ceil(N / chunk) is at most this.
    num_warps: Triton warps per program; num_stages: Triton software-pipelining stages. 2 and 2:
      forward + backward 10-18% faster than 4 and 1 at every ViG shape timed (H200; notes).
    exact_diagonal: build the 16 x 16 diagonal blocks from a masked [16, 16, K] exponential (every
      exponent <= 0, any gates); else from two dots around the block's middle row (much cheaper,
      finite while gates stay above about -11 per token).
    split_backward: long plan: one backward chunk kernel per direction (the second adds the
      first's fp32 dq, dk, dv) instead of one kernel doing both, halving each program's live state.
      None: split when K >= SPLIT_MIN_K (see `_split_backward`).
    states_span: long plan: chunks walked in sequence per states program. 0: one program per
      (b, h) walks all NT chunks (B * H programs). L >= 1: spans of L chunks, B * H * ceil(NT / L)
      programs, at the cost of a second states launch (each span's own states, then a scan over
      spans in XLA, then the walk from the scanned states; L = 1 needs no walk). None: 0 when
      B * H >= STATE_PROGRAMS, else spans giving about STATE_PROGRAMS programs (`_states_span`).
    span_scan: how the spans' states are scanned (`_scan_spans`): "walk" (a Pallas kernel, one
      program per (b, h) and 16 columns of V walking the spans in sequence), "matmul" or
      "associative" (XLA), "xla" (matmul up to SCAN_MATMUL_MAX_SPANS spans, else associative);
      "auto": "walk" up to WALK_MAX_SPANS spans, else "xla".
    sub_blocks: long plan: the chunk kernels run one program per 16-row sub-block (grid
      ceil(N / 16) x B x H), each carrying its chunk's states through the chunk's other sub-blocks
      to its own, instead of one program per chunk holding every sub-block's partial results
      (which spills registers). The backward then does both directions in one launch (no split,
      no fp32 partials).
    states_dtype: long plan: the dtype in which the states entering every chunk go through HBM
      from the states kernels to the chunk kernels: "float32", or "input" (the dtype of q, k, v:
      bf16 inputs halve that traffic; the chunk kernels' dots read the states in that dtype
      anyway, their fp32 updates start from the rounded values; the default). Accumulation
      stays fp32.
    save_states: long plan: keep the forward's entering states (Sf, Sb) as residuals of the
      custom_vjp, so that the backward's states launches compute only the adjoints dSf, dSb, at the
      cost of 2 * B * H * NT * K * V values (in `states_dtype`) of activation memory per call
      (the default; False recomputes them in the backward).
    lean_states: where a program's gradient work is one sub-block (chunk 16, or any chunk with
      `sub_blocks`), its backward takes the gates' tail from the entering state and its dk term
      instead of building the state leaving the sub-block, and at chunk 16 the chunk kernels keep
      the states they read in their stored dtype (`states_dtype`; they only feed dots, which
      take that dtype anyway) instead of float32 copies: two fewer [K, V] float32 tensors and
      one dot fewer per direction in the backward program, whose 2 warps ran at 255 registers
      per thread with local-memory spills without it (ncu, H200, ViG-S 224).
    fwd_warps, bwd_warps: Triton warps of the long plan's forward and backward chunk (or
      sub-block) kernels; None: num_warps (the states kernels and the split backward take
      num_warps). 1 and None: forward 3-4% faster than at 2 warps (ViG-S 224, ViG-T 1024); the
      backward at 4 warps was 17-30% slower, at 1 between -3% and +1% (H200; notes).
    subs_per_program: `sub_blocks` kernels: consecutive 16-row sub-blocks per program, walked in
      a loop (whose next sub-block's loads Triton may issue during the current one's work) with
      every chunk's states of the (b, h) in reach, instead of one sub-block per program.
    walk_unroll: the span walk (`span_scan`) takes this many spans per loop iteration, their
      loads issued together ahead of the chain of multiply-adds (4 warps when > 1; 1: one span
      per iteration at 1 warp). 8 against 1: forward + backward 9-23% faster at ViG-T 1024²-4096²
      (16 as fast as 8; H200, notes).
    states_stages: Triton pipelining stages of the states kernels (their loops over chunks);
      None: num_stages. subs_per_program 2 and states_stages 3 against 1 and num_stages:
      forward 10-13% and forward + backward 3-11% faster at ViG-S/B 224² and ViG-T 1024²-4096²;
      4 sub-blocks per program or 3 stages for every kernel were slower at 224² (H200; notes).
    interpret: run in Pallas interpret mode (CPU tests).
    """

    chunk: int = 16
    short_max_chunks: int = 1
    num_warps: int = 2
    num_stages: int = 2
    exact_diagonal: bool = False
    split_backward: bool | None = None
    states_span: int | None = None
    span_scan: str = "auto"
    sub_blocks: bool = True
    states_dtype: str = "input"
    save_states: bool = True
    lean_states: bool = True
    fwd_warps: int | None = 1
    bwd_warps: int | None = None
    subs_per_program: int = 2
    states_stages: int | None = 3
    walk_unroll: int = 8
    interpret: bool = False


# Backward chunk kernels on an H100 (notes_bigla.md, v5), split per direction vs fused, µs:
# K 32, V 64 (ViG-S/B 224, ViG-T 1024): 843 vs 1198, 1648 vs 2417, 486 vs 586: split wins;
# K 16, V 32 (ViG-H-T stage 1): 2977 vs 2176: fused wins (little live state to save, and the
# split's fp32 partials of dq, dk, dv cost a larger share of the traffic).
SPLIT_MIN_K = 32

# states_span=None: one sequential program per (b, h) when B * H >= STATE_PROGRAMS (two per SM on
# a 132-SM H100/H200; at 224², with 7 chunks, span plans were 1.8-2.3x slower), else spans giving
# about SPAN_PROGRAMS programs (three per SM): on an H200 ~384 programs were fastest at (8, 4096, 3)
# and (2, 16384, 3), fwd+bwd 0.587 / 0.639 ms against 0.621 / 0.654 at ~264 and 0.665 / 0.679 at
# ~192 (commit 55ac12a, bench_bigla.py --variant s8:states_span=8 ...).
STATE_PROGRAMS = 264
SPAN_PROGRAMS = 396
# The matmul scan over spans builds [NS, NS, K] weights per (b, h) and state; beyond this many
# spans the associative scan (O(NS) memory) takes over.
SCAN_MATMUL_MAX_SPANS = 256


def _split_backward(K, params):
    if params.split_backward is None:
        return K >= SPLIT_MIN_K
    return params.split_backward


def _use_short_path(n, params):
    """One program per (b, h) saves the states' HBM round trip and two launches, but unrolls the
    chunk loop. Measured on H100 (notes_bigla.md): at NT = 4 it ran slower than the chunk-parallel
    plan (384 programs, each a long dependent chain) and took minutes to compile, hence the default
    short_max_chunks = 1: only a single-chunk sequence (N <= BT) takes it."""
    return math.ceil(n / params.chunk) <= params.short_max_chunks


def _matmul_dtype(dtype):
    """Dot operand dtype: the input dtype, except fp16 -> bf16, since fp32 states and the fast
    diagonal's factors (up to e^88) overflow fp16; bf16 runs at the same tensor-core rate."""
    return jnp.bfloat16 if dtype == jnp.float16 else dtype


def _chunk_ok(bt):
    return bt >= SUB_CHUNK and bt % SUB_CHUNK == 0 and bt & (bt - 1) == 0


def supports(K, V, chunk):
    """Whether the kernels take head dims K, V and chunk size `chunk` (see `_check`)."""
    return K in HEAD_DIMS and V in HEAD_DIMS and _chunk_ok(chunk)


def _check(q, v, params):
    _, _, _, K = q.shape
    V = v.shape[-1]
    if K not in HEAD_DIMS or V not in HEAD_DIMS:
        raise ValueError(f"pallas BiGLA needs K and V in {HEAD_DIMS}; got {K=}, {V=} ({q.shape=})")
    bt = params.chunk
    if not _chunk_ok(bt):
        raise ValueError(f"chunk={bt} must be a power of two >= {SUB_CHUNK}")
    if q.shape[1] < 1:
        raise ValueError(f"need at least one token, got {q.shape=}")
    if params.states_dtype not in STATES_DTYPES:
        raise ValueError(f"states_dtype={params.states_dtype!r} is not one of {STATES_DTYPES}")
    for name in ("subs_per_program", "states_stages", "walk_unroll"):
        value = getattr(params, name)
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be a positive int")


# ----------------------------------------------------------------------------------------------
# Building blocks used inside the kernels (all values fp32 unless cast for a dot).


class _Logits:
    """A gate ref holding logits x: its rows load as the log gates log_sigmoid(x) * scale, fp32."""

    def __init__(self, ref, scale):
        self.ref, self.scale, self.shape = ref, scale, ref.shape


class _LogitGrads:
    """An output ref for dL/dx of logits x (in x_ref): rows stored as dL/dg get the chain rule's
    dg/dx = sigmoid(-x) * scale."""

    def __init__(self, ref, x_ref, scale):
        self.ref, self.x_ref, self.scale, self.shape = ref, x_ref, scale, ref.shape


def _log_sigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(e^-|x|): no overflow, exact for small gates."""
    return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


class _Cols:
    """Columns [col, col + width) of a [N, C] ref (one head of a packed [B, N, C] input or
    output, `_Packed`), read as if they were a [N, width] ref: values times `scale` (rounded back
    to the ref's dtype, as XLA scales q), and stored values (gradients) times `scale`."""

    def __init__(self, ref, col, width, scale=1.0):
        self.ref, self.col, self.scale = ref, col, scale
        self.shape, self.dtype = (ref.shape[0], width), ref.dtype

    def rows(self, start, rows):
        return self.ref.at[pl.ds(start, rows), pl.ds(self.col, self.shape[1])]

    def factor(self):
        """The scale as applied: rounded to the ref's dtype (the model's q * scale in bf16)."""
        return jnp.asarray(self.scale, self.dtype).astype(jnp.float32)


def _rows_at(ref, start, rows):
    """The [rows, d] window of a [N, d] ref or `_Cols` view at row `start`."""
    return ref.rows(start, rows) if isinstance(ref, _Cols) else ref.at[pl.ds(start, rows), :]


def _load_rows(ref, start, rows, n):
    """Rows [start, start + rows) of a [N, d] ref (or `_Cols` view); rows past N read 0 (neutral
    both ways), also as gates of a `_Logits` ref (masked after the log_sigmoid, which maps 0 to
    -log 2)."""
    mask = (start + jnp.arange(rows, dtype=jnp.int32) < n)[:, None]
    if isinstance(ref, _Logits):
        x = pltriton.load(_rows_at(ref.ref, start, rows), mask=mask, other=0.0)
        return jnp.where(mask, _log_sigmoid(x.astype(jnp.float32)) * ref.scale, 0.0)
    x = pltriton.load(_rows_at(ref, start, rows), mask=mask, other=0.0)
    if isinstance(ref, _Cols) and ref.scale != 1.0:
        x = (x.astype(jnp.float32) * ref.factor()).astype(x.dtype)
    return x


def _store_rows(ref, start, val, n):
    mask = (start + jnp.arange(val.shape[0], dtype=jnp.int32) < n)[:, None]
    if isinstance(ref, _LogitGrads):
        x = _load_rows(ref.x_ref, start, val.shape[0], n).astype(jnp.float32)
        val, ref = val * (ref.scale / (1.0 + jnp.exp(x))), ref.ref  # sigmoid(-x); e^x = inf -> 0
    if isinstance(ref, _Cols) and ref.scale != 1.0:
        val = val * ref.factor()
    pltriton.store(_rows_at(ref, start, val.shape[0]), val.astype(ref.dtype), mask=mask)


def _dir_cumsum(x, reverse):
    """Inclusive cumsum along rows in the direction's order: [R, K] -> [R, K] (Triton has no reverse
    cumsum, so the reverse one is total - cumsum + x)."""
    c = jnp.cumsum(x, axis=0)
    return jnp.sum(x, axis=0)[None, :] - c + x if reverse else c


def _decays(g, reverse):
    """Gate sums of one block of rows g [R, K]: total T [K] and X [R, K], the inclusive cumsum in
    the direction's order. e^X decays a state entering the block down to row t; e^(T - X) decays
    row s up to the block's exit. Both exponents are <= 0 for gates <= 0."""
    return jnp.sum(g, axis=0), _dir_cumsum(g, reverse)


def _diag_decay(x, reverse):
    """E[t, s, d] = exp(X_td - X_sd) if s is at or before t in the direction, else 0: [R, R, K]."""
    r = x.shape[0]
    t = jnp.arange(r, dtype=jnp.int32)[:, None, None]
    s = jnp.arange(r, dtype=jnp.int32)[None, :, None]
    keep = s >= t if reverse else s <= t
    return jnp.exp(jnp.where(keep, x[:, None, :] - x[None, :, :], -jnp.inf))


def _diag_mask(r, reverse):
    t = jnp.arange(r, dtype=jnp.int32)[:, None]
    s = jnp.arange(r, dtype=jnp.int32)[None, :]
    return s >= t if reverse else s <= t


def _diag_factors(x):
    """Fast diagonal: e^(X - X_m) and e^(X_m - X) around the block's middle row m, [R, K] each.
    Their product is exact, but one factor of a pair can reach e^(8 |g|max): fp32/bf16 overflow
    once a gate is below about -11 per token (so the exact form stays available)."""
    r = x.shape[0]
    rows = jnp.arange(r, dtype=jnp.int32)[:, None]
    xm = jnp.sum(jnp.where(rows == r // 2, x, 0.0), axis=0)[None, :]
    return jnp.exp(x - xm), jnp.exp(xm - x)


def _diag_scores(q, k, x, reverse, exact, mm):
    """D[t, s] = sum_d q_td k_sd exp(X_td - X_sd) for s at or before t in the direction: [R, R]."""
    if exact:
        return jnp.sum(q[:, None, :] * k[None, :, :] * _diag_decay(x, reverse), axis=2)
    eq, ek = _diag_factors(x)
    d = _dot(q * eq, k * ek, mm, trans_b=True)
    return jnp.where(_diag_mask(x.shape[0], reverse), d, 0.0)


def _diag_grads(q, k, x, dd, reverse, exact, mm):
    """(D, dq, dk) of the diagonal block given dD = dL/dD [R, R] (unmasked)."""
    if exact:
        e = _diag_decay(x, reverse)  # [R, R, K]
        w = dd[:, :, None] * e
        d = jnp.sum(q[:, None, :] * k[None, :, :] * e, axis=2)
        return d, jnp.sum(w * k[None, :, :], axis=1), jnp.sum(w * q[:, None, :], axis=0)
    eq, ek = _diag_factors(x)
    qh, kh, dm = q * eq, k * ek, mm
    mask = _diag_mask(x.shape[0], reverse)
    d = jnp.where(mask, _dot(qh, kh, dm, trans_b=True), 0.0)
    dd = jnp.where(mask, dd, 0.0)
    return d, _dot(dd, kh, dm) * eq, _dot(dd, qh, dm, trans_a=True) * ek


def _dot(a, b, mm, *, trans_a=False, trans_b=False):
    """a @ b with operands in the matmul dtype `mm` (the input dtype) and fp32 accumulation.

    float32 operands ask for IEEE precision: Triton's default for them is TF32 (~1e-3 relative
    error, measured on the H100), which would make float32 inputs no better than bfloat16 ones.
    """
    precision = lax.Precision.HIGHEST if jnp.dtype(mm) == jnp.float32 else None
    out = pltriton.dot(
        a.astype(mm), b.astype(mm), trans_a=trans_a, trans_b=trans_b, precision=precision
    )
    return out.astype(jnp.float32)


def _state_step(s, k, v, g, reverse, mm):
    """State [K, V] after one chunk (k [R, K], v [R, V], g [R, K]) in the given direction."""
    total, x = _decays(g, reverse)
    ke = k * jnp.exp(total[None, :] - x)
    return jnp.exp(total)[:, None] * s + _dot(ke, v, mm, trans_a=True)


def _adjoint_step(ds, q, do, g, reverse, mm):
    """Adjoint [K, V] of the state entering a chunk from the adjoint of the state leaving it."""
    total, x = _decays(g, reverse)
    return jnp.exp(total)[:, None] * ds + _dot(q * jnp.exp(x), do, mm, trans_a=True)


def _state(ref, lean=False, rows=None):
    """A [K, V] state block as fp32, or with `lean` as stored (`KernelParams.states_dtype`);
    `rows`: its window (`pl.ds`) in a ref holding several chunks' states."""
    x = ref[...] if rows is None else ref[rows, :]
    return x if lean else x.astype(jnp.float32)


def _load_chunk(refs, c, bt, n):
    """The listed [N, d] refs' rows of chunk c, as fp32 arrays [BT, d]."""
    return [_load_rows(r, c * bt, bt, n).astype(jnp.float32) for r in refs]


# ----------------------------------------------------------------------------------------------
# Per-chunk bodies, shared by both plans.


class _Rows:
    """Sub-block reader of chunk c: rows(j, i) is sub-block i of input j, [BC, d] fp32 (times the
    input's scale), read at its use site. Re-reading hits L1/L2; keeping every input of the chunk
    live across the body costs ~100 registers per thread at 4 warps (see notes_bigla.md)."""

    def __init__(self, refs, c, bt, n, scales=None):
        self.refs, self.c, self.bt, self.n = refs, c, bt, n
        self.scales = scales or (1.0,) * len(refs)
        self.nb = bt // SUB_CHUNK

    def __call__(self, j, i):
        x = _load_rows(self.refs[j], self.c * self.bt + i * SUB_CHUNK, SUB_CHUNK, self.n)
        x = x.astype(jnp.float32)
        return x if self.scales[j] == 1.0 else self.scales[j] * x

    def width(self, j):
        return self.refs[j].shape[-1]

    def select(self, js):
        """A reader of inputs js only (renumbered 0, 1, ...)."""
        refs = tuple(self.refs[j] for j in js)
        return _Rows(refs, self.c, self.bt, self.n, tuple(self.scales[j] for j in js))


def _fwd_chunk(rows, sf, sb, mm, exact):
    """o of one chunk, [BC, V] per sub-block, from its rows (q, k, v, gf, gb: a `_Rows`) and
    entering states Sf, Sb [K, V]."""
    nb = rows.nb
    V = rows.width(2)
    acc = [jnp.zeros((SUB_CHUNK, V), jnp.float32) for _ in range(nb)]
    diag = [None] * nb
    for reverse, s, gi in ((False, sf, 3), (True, sb, 4)):
        order = list(range(nb))[::-1] if reverse else list(range(nb))
        for step, i in enumerate(order):
            q, k, v, g = rows(0, i), rows(1, i), rows(2, i), rows(gi, i)
            total, x = _decays(g, reverse)
            acc[i] = acc[i] + _dot(q * jnp.exp(x), s, mm)
            d = _diag_scores(q, k, x, reverse, exact, mm)
            diag[i] = d if diag[i] is None else diag[i] + d  # [BC, BC]: both directions
            if step + 1 < nb:
                ke = k * jnp.exp(total[None, :] - x)
                s = jnp.exp(total)[:, None] * s + _dot(ke, v, mm, trans_a=True)
    # The diagonal counts in both directions, as in the spec; the mean halves everything once.
    return [0.5 * (acc[i] + _dot(diag[i], rows(2, i), mm)) for i in range(nb)]


def _diag_block_grads(q, k, v, do, x, reverse, exact, mm):
    """(dq, dk, dv) terms of a sub-block's diagonal block, from do' (dD = do' v^T: [BC, BC])."""
    ddiag = _dot(do, v, mm, trans_b=True)
    d, dq, dk = _diag_grads(q, k, x, ddiag, reverse, exact, mm)
    return dq, dk, _dot(d, do, mm, trans_a=True)


def _gate_grads(r, later, reverse):
    """(dg, later') of a sub-block: dg[t] = `later` (the gradient from the rows after the
    sub-block) plus r summed over its rows at or after t in the direction; later' for the
    sub-block before it."""
    total_r, x_r = _decays(r, reverse)
    return later[None, :] + total_r[None, :] - x_r + r, later + total_r


def _bwd_block_dir(rows, s, u, reverse, mm, exact):
    """`_bwd_chunk_dir` of a chunk of one sub-block (`KernelParams.lean_states`): s and u stay in
    their stored dtype (dot operands only), and the gates' tail needs no state leaving the chunk:
    sum_v S_out u = e^T sum_v S u + sum_t k (v u^T) e^(T - X), whose second term is the dk term's
    (k * dk summed over the rows), and whose first is the diagonal of the [K, K] product S u^T."""
    q, k, v, g, do = (rows(j, 0) for j in range(5))
    total, x = _decays(g, reverse)
    ekx = jnp.exp(total[None, :] - x)
    dq = _dot(do, s, mm, trans_b=True) * jnp.exp(x)
    dk = _dot(v, u, mm, trans_b=True) * ekx
    dv = _dot(k * ekx, u, mm)
    eye = _diag_mask(s.shape[0], False) & _diag_mask(s.shape[0], True)
    su = jnp.sum(jnp.where(eye, _dot(s, u, _matmul_dtype(s.dtype), trans_b=True), 0.0), axis=1)
    tail = jnp.exp(total) * su + jnp.sum(k * dk, axis=0)  # [K]: fla's b_dgk
    dq_diag, dk_diag, dv_diag = _diag_block_grads(q, k, v, do, x, reverse, exact, mm)
    dq, dk, dv = dq + dq_diag, dk + dk_diag, dv + dv_diag
    r = q * dq - k * dk  # dL/dX of this direction's gates
    return dq, dk, dv, _gate_grads(r, tail, reverse)[0]


def _bwd_chunk_dir(rows, s_in, u_out, reverse, mm, exact, lean=False):
    """One direction's share of one chunk's gradients per sub-block: (dq, dk, dv, dg), [BC, d] fp32.

    rows: `_Rows` of (q, k, v, g, do') with g this direction's gates and do' = do / 2.
    s_in: the direction's state entering the chunk; u_out: the adjoint of its state leaving it.
    lean: `KernelParams.lean_states` (a chunk of one sub-block takes `_bwd_block_dir`).
    """
    nb = rows.nb
    if lean and nb == 1:
        return [_bwd_block_dir(rows, s_in, u_out, reverse, mm, exact)]
    q_, k_, v_, g_, do_ = (functools.partial(rows, j) for j in range(5))  # q_(i): sub-block i
    order = list(range(nb))[::-1] if reverse else list(range(nb))
    decays = [_decays(g_(i), reverse) for i in range(nb)]
    dq, dk, dv = [None] * nb, [None] * nb, [None] * nb
    # Along the direction: consume the state entering each sub-block at once (its dq term)
    # instead of keeping a list of [K, V] states, which would spill registers.
    s = s_in
    for i in order:
        total, x = decays[i]
        dq[i] = _dot(do_(i), s, mm, trans_b=True) * jnp.exp(x)
        ke = k_(i) * jnp.exp(total[None, :] - x)
        s = jnp.exp(total)[:, None] * s + _dot(ke, v_(i), mm, trans_a=True)
    tail = jnp.sum(s * u_out, axis=1)  # [K]: dL/d(gates of all later chunks), fla's b_dgk
    # Against the direction: the adjoint of the state leaving each sub-block, used at once.
    u = u_out
    for i in order[::-1]:
        total, x = decays[i]
        ekx = jnp.exp(total[None, :] - x)
        dk[i] = _dot(v_(i), u, mm, trans_b=True) * ekx
        dv[i] = _dot(k_(i) * ekx, u, mm)
        if i != order[0]:
            u = jnp.exp(total)[:, None] * u + _dot(q_(i) * jnp.exp(x), do_(i), mm, trans_a=True)
    r = [None] * nb
    for i in order:
        q, k = q_(i), k_(i)
        dq_diag, dk_diag, dv_diag = _diag_block_grads(
            q, k, v_(i), do_(i), decays[i][1], reverse, exact, mm
        )
        dq[i] = dq[i] + dq_diag
        dk[i] = dk[i] + dk_diag
        dv[i] = dv[i] + dv_diag
        r[i] = q * dq[i] - k * dk[i]  # dL/dX of this direction's gates
    # dg[t] = sum of r over rows at or after t in the direction, within the chunk, plus tail.
    dg = [None] * nb
    later = tail
    for i in order[::-1]:
        dg[i], later = _gate_grads(r[i], later, reverse)
    return [(dq[i], dk[i], dv[i], dg[i]) for i in range(nb)]


def _bwd_chunk(rows, states, mm, exact, lean=False):
    """Gradients of one chunk per sub-block, both directions: (dq, dk, dv, dgf, dgb), [BC, d] fp32.

    rows: `_Rows` of (q, k, v, gf, gb, do') with do' = do / 2.
    states: (Sf entering, Sb entering, dSf = adjoint of Sf leaving, dSb = adjoint of Sb leaving).
    """
    f = _bwd_chunk_dir(rows.select((0, 1, 2, 3, 5)), states[0], states[2], False, mm, exact, lean)
    b = _bwd_chunk_dir(rows.select((0, 1, 2, 4, 5)), states[1], states[3], True, mm, exact, lean)
    return [
        (*(x + y for x, y in zip(fi[:3], bi[:3], strict=True)), fi[3], bi[3])
        for fi, bi in zip(f, b, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Kernels. Refs of the inputs are [N, d] views of one (b, h); state refs are [NT * K, V] or [K, V].


def _store_blocks(out_refs, blocks_out, c, bt, n):
    for i, vals in enumerate(blocks_out):
        for ref, val in zip(out_refs, vals, strict=True):
            _store_rows(ref, c * bt + i * SUB_CHUNK, val, n)


def _traced_chunk_ids(nt):
    """Chunk ids 0..nt-1 as traced int32: Pallas rejects static slices that run past N at trace
    time, while the masked loads make the overhang harmless."""
    zero = pl.program_id(0) * 0
    return [zero + c for c in range(nt)]


def _bigla_fwd_short_kernel(q_ref, k_ref, v_ref, gf_ref, gb_ref, o_ref, *, n, bt, mm, exact):
    nt = math.ceil(n / bt)
    cid = _traced_chunk_ids(nt)
    K, V = q_ref.shape[-1], v_ref.shape[-1]
    sb = [None] * nt
    s = jnp.zeros((K, V), jnp.float32)
    for c in reversed(range(nt)):
        sb[c] = s
        if c:
            k, v, gb = _load_chunk((k_ref, v_ref, gb_ref), cid[c], bt, n)
            s = _state_step(s, k, v, gb, True, mm)
    s = jnp.zeros((K, V), jnp.float32)
    for c in range(nt):
        rows = _Rows((q_ref, k_ref, v_ref, gf_ref, gb_ref), cid[c], bt, n)
        _store_blocks(
            (o_ref,), [(o,) for o in _fwd_chunk(rows, s, sb[c], mm, exact)], cid[c], bt, n
        )
        if c + 1 < nt:
            k, v, gf = _load_chunk((k_ref, v_ref, gf_ref), cid[c], bt, n)
            s = _state_step(s, k, v, gf, False, mm)


# The states a states launch can carry, in their order: Sf and dSb run left to right, Sb and dSf
# right to left; Sf and dSf decay by gf, Sb and dSb by gb.
STATE_KINDS = ("sf", "sb", "dsf", "dsb")
_REVERSE = {"sf": False, "sb": True, "dsf": True, "dsb": False}


def _state_kinds(adjoints, fwd_states=True):
    """The states one launch computes: Sf, Sb; with `adjoints` also dSf, dSb; without
    `fwd_states` (the backward with saved forward states) dSf, dSb only."""
    return STATE_KINDS[0 if fwd_states else 2 : 4 if adjoints else 2]


def _bigla_states_kernel(*refs, n, bt, span, mm, kinds, has_init, summary):
    """States of the chunks of one span (`span` consecutive chunks; program id 0 picks the span).

    Inputs: k, v, gf, gb (with adjoints among `kinds`: q, k, v, gf, gb, do), then with
    `has_init` the `kinds` states entering the span, [K, V] each; else they start at zero.
    Sf runs left to right and Sb right to left; dSf (right to left) and dSb (left to right) are
    the adjoints of the states leaving each chunk. `kinds`: which of them (`_state_kinds`).
    summary=False: writes every chunk's entering states, [span * K, V] per state.
    summary=True: writes only the states leaving the span (its own contribution when they start
    at zero), [K, V] each, then the span's gate totals sum(gf), sum(gb) [K] (log decays, <= 0).
    """
    adjoints, nst = "dsf" in kinds, len(kinds)
    nin = 6 if adjoints else 4
    ins, init, outs = refs[:nin], refs[nin : nin + nst * has_init], refs[nin + nst * has_init :]
    if adjoints:
        q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref = ins
    else:
        k_ref, v_ref, gf_ref, gb_ref = ins
    K, V = k_ref.shape[-1], v_ref.shape[-1]
    base = pl.program_id(0) * span

    def body(it, carry):
        states, totals = dict(zip(kinds, carry[:nst], strict=True)), carry[nst:]
        # This step's chunk for each sweep direction: local index into the span, global chunk id.
        i_fwd, i_bwd = it, span - 1 - it
        c_fwd, c_bwd = base + i_fwd, base + i_bwd
        if not summary:
            for ref, kind in zip(outs, kinds, strict=True):
                i = i_bwd if _REVERSE[kind] else i_fwd
                ref[pl.ds(i * K, K), :] = states[kind].astype(ref.dtype)
        new, sums = {}, None  # with summary: this step's gate sums (each chunk's once per gate)
        if "sf" in kinds:
            k, v, gf = _load_chunk((k_ref, v_ref, gf_ref), c_fwd, bt, n)
            new["sf"] = _state_step(states["sf"], k, v, gf, False, mm)
            k, v, gb = _load_chunk((k_ref, v_ref, gb_ref), c_bwd, bt, n)
            new["sb"] = _state_step(states["sb"], k, v, gb, True, mm)
            if summary:
                sums = (jnp.sum(gf, axis=0), jnp.sum(gb, axis=0))
        if adjoints:
            q, do, gf = _load_chunk((q_ref, do_ref, gf_ref), c_bwd, bt, n)
            new["dsf"] = _adjoint_step(states["dsf"], q, 0.5 * do, gf, False, mm)
            q, do, gb = _load_chunk((q_ref, do_ref, gb_ref), c_fwd, bt, n)
            new["dsb"] = _adjoint_step(states["dsb"], q, 0.5 * do, gb, True, mm)
            if summary and sums is None:
                sums = (jnp.sum(gf, axis=0), jnp.sum(gb, axis=0))
        if summary:
            totals = (totals[0] + sums[0], totals[1] + sums[1])
        return (*(new[kind] for kind in kinds), *totals)

    if has_init:
        states = tuple(r[...] for r in init)
    else:
        states = (jnp.zeros((K, V), jnp.float32),) * nst
    totals = (jnp.zeros((K,), jnp.float32),) * 2 if summary else ()
    final = lax.fori_loop(0, span, body, (*states, *totals))
    if summary:
        for ref, val in zip(outs, final, strict=True):
            ref[...] = val


def _bigla_fwd_chunk_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, sf_ref, sb_ref, o_ref, *, n, bt, mm, exact, lean
):
    c = pl.program_id(0)
    rows = _Rows((q_ref, k_ref, v_ref, gf_ref, gb_ref), c, bt, n)
    out = _fwd_chunk(rows, _state(sf_ref, lean), _state(sb_ref, lean), mm, exact)
    _store_blocks((o_ref,), [(o,) for o in out], c, bt, n)


def _bwd_rows(refs, c, bt, n):
    """`_Rows` of the backward's inputs, do last: the mean's 1/2 is folded into do."""
    return _Rows(refs, c, bt, n, scales=(1.0,) * (len(refs) - 1) + (0.5,))


def _bigla_bwd_short_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref, *out_refs, n, bt, mm, exact
):
    nt = math.ceil(n / bt)
    cid = _traced_chunk_ids(nt)
    K, V = q_ref.shape[-1], v_ref.shape[-1]
    zero = jnp.zeros((K, V), jnp.float32)
    sb, dsf = [None] * nt, [None] * nt
    s, ds = zero, zero
    for c in reversed(range(nt)):
        sb[c], dsf[c] = s, ds
        if c:
            q, k, v, gf, gb, do = _load_chunk(
                (q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref), cid[c], bt, n
            )
            s = _state_step(s, k, v, gb, True, mm)
            ds = _adjoint_step(ds, q, 0.5 * do, gf, False, mm)
    s, ds = zero, zero
    for c in range(nt):
        rows = _bwd_rows((q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref), cid[c], bt, n)
        _store_blocks(out_refs, _bwd_chunk(rows, (s, sb[c], dsf[c], ds), mm, exact), cid[c], bt, n)
        if c + 1 < nt:
            q, k, v, gf, gb, do = _load_chunk(
                (q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref), cid[c], bt, n
            )
            s = _state_step(s, k, v, gf, False, mm)
            ds = _adjoint_step(ds, q, 0.5 * do, gb, True, mm)


def _bigla_bwd_chunk_kernel(
    q_ref,
    k_ref,
    v_ref,
    gf_ref,
    gb_ref,
    do_ref,
    sf_ref,
    sb_ref,
    dsf_ref,
    dsb_ref,
    *out_refs,
    n,
    bt,
    mm,
    exact,
    lean,
):
    c = pl.program_id(0)
    rows = _bwd_rows((q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref), c, bt, n)
    states = tuple(_state(r, lean) for r in (sf_ref, sb_ref, dsf_ref, dsb_ref))
    _store_blocks(out_refs, _bwd_chunk(rows, states, mm, exact, lean), c, bt, n)


def _bigla_bwd_dir_kernel(
    q_ref, k_ref, v_ref, g_ref, do_ref, *refs, n, bt, mm, exact, reverse, lean
):
    """One direction of the backward chunk kernel (split_backward). Forward direction: refs are
    (S, dS, out dq, dk, dv, dgf); writes dq, dk, dv as fp32 partials. Backward direction: refs are
    (partial dq, dk, dv, S, dS, out dq, dk, dv, dgb); adds its own terms to the partials."""
    c = pl.program_id(0)
    partials, refs = (refs[:3], refs[3:]) if reverse else ((), refs)
    s_ref, u_ref, *out_refs = refs
    rows = _bwd_rows((q_ref, k_ref, v_ref, g_ref, do_ref), c, bt, n)
    blocks = _bwd_chunk_dir(
        rows, _state(s_ref, lean), _state(u_ref, lean), reverse, mm, exact, lean
    )
    if partials:
        read = _Rows(partials, c, bt, n)
        blocks = [
            (*(x + read(j, i) for j, x in enumerate(vals[:3])), vals[3])
            for i, vals in enumerate(blocks)
        ]
    _store_blocks(out_refs, blocks, c, bt, n)


def _walk(s, i, nb, toward_right, step):
    """s carried by step(s, j) through the chunk's sub-blocks before sub-block i, left to right
    (`toward_right`), or through those after it, right to left; i may be traced."""
    if toward_right:
        return lax.fori_loop(0, i, lambda it, s: step(s, it), s)
    return lax.fori_loop(0, nb - 1 - i, lambda it, s: step(s, nb - 1 - it), s)


def _carried_state(rows, s, i, gi, reverse, mm):
    """A direction's state entering sub-block i, from s entering the chunk in that direction
    (rows: the chunk's `_Rows`, k and v at 1 and 2, the direction's gates at gi). A chunk of one
    sub-block returns s as it is (in its stored dtype under `lean_states`)."""
    if rows.nb == 1:
        return s
    step = lambda s, j: _state_step(s, rows(1, j), rows(2, j), rows(gi, j), reverse, mm)
    return _walk(s.astype(jnp.float32), i, rows.nb, not reverse, step)


def _carried_adjoint(rows, u, i, gi, reverse, mm):
    """The adjoint of a direction's state leaving sub-block i, from u, the adjoint of that state
    leaving the chunk (rows: q at 0, do' at 5); it runs against the direction. As
    `_carried_state` for a chunk of one sub-block."""
    if rows.nb == 1:
        return u
    step = lambda u, j: _adjoint_step(u, rows(0, j), rows(5, j), rows(gi, j), reverse, mm)
    return _walk(u.astype(jnp.float32), i, rows.nb, reverse, step)


def _for_sub_blocks(bt, per, n, K, body):
    """body(p, c, i, state) for each of the program's `per` consecutive 16-row sub-blocks p (its
    chunk c, its index i in the chunk); state(ref, lean) reads chunk c's [K, V] state (as
    `_state`) from a states ref:
    the program's own chunk's block (per = 1), or with per > 1 the whole [NTp * K, V] of its
    (b, h), c clamped to the last chunk for sub-blocks past N (whose loads and stores are
    masked). per > 1 runs them in a loop, which Triton may software-pipeline."""
    nb = bt // SUB_CHUNK
    if per == 1:
        p = pl.program_id(0)
        body(p, p // nb, p % nb, _state)
        return
    last = math.ceil(n / bt) - 1
    first = pl.program_id(0) * per  # (outside the loop: interpret mode has no program_id there)

    def step(j, carry):
        p = first + j
        c = jnp.minimum(p // nb, last)
        body(p, c, p % nb, lambda ref, lean: _state(ref, lean, pl.ds(c * K, K)))
        return carry

    lax.fori_loop(0, per, step, 0)


def _bigla_fwd_sub_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, sf_ref, sb_ref, o_ref, *, n, bt, mm, exact, lean, per
):
    """o of 16-row sub-blocks (`sub_blocks`): each one's entering states from its chunk's,
    carried through the chunk's sub-blocks before it (Sf) and after it (Sb)."""

    def body(p, c, i, state):
        rows = _Rows((q_ref, k_ref, v_ref, gf_ref, gb_ref), c, bt, n)
        sf = _carried_state(rows, state(sf_ref, lean), i, 3, False, mm)
        sb = _carried_state(rows, state(sb_ref, lean), i, 4, True, mm)
        (o,) = _fwd_chunk(_Rows(rows.refs, p, SUB_CHUNK, n), sf, sb, mm, exact)
        _store_rows(o_ref, p * SUB_CHUNK, o, n)

    _for_sub_blocks(bt, per, n, q_ref.shape[-1], body)


def _bigla_bwd_sub_kernel(
    q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref, sf_ref, sb_ref, dsf_ref, dsb_ref, *out_refs,
    n, bt, mm, exact, lean, per,
):  # fmt: skip
    """Gradients of 16-row sub-blocks, both directions (`sub_blocks`). Per direction, a
    sub-block's state entering it and the adjoint of its state leaving it come from the chunk's
    (the state kernels' Sf, Sb entering and dSf, dSb leaving the chunk) carried through the
    chunk's other sub-blocks; one direction at a time keeps two [K, V] states live, not four."""
    refs = (q_ref, k_ref, v_ref, gf_ref, gb_ref, do_ref)

    def body(p, c, i, state):
        rows = _bwd_rows(refs, c, bt, n)
        sub = _bwd_rows(refs, p, SUB_CHUNK, n)
        grads = []  # per direction (dq, dk, dv, dg) of the sub-block
        for reverse, gi, s_ref, u_ref in ((False, 3, sf_ref, dsf_ref), (True, 4, sb_ref, dsb_ref)):
            s = _carried_state(rows, state(s_ref, lean), i, gi, reverse, mm)
            u = _carried_adjoint(rows, state(u_ref, lean), i, gi, reverse, mm)
            grads += _bwd_chunk_dir(sub.select((0, 1, 2, gi, 5)), s, u, reverse, mm, exact, lean)
        (dq, dk, dv, dgf), (dq_b, dk_b, dv_b, dgb) = grads
        vals = (dq + dq_b, dk + dk_b, dv + dv_b, dgf, dgb)
        for ref, val in zip(out_refs, vals, strict=True):
            _store_rows(ref, p * SUB_CHUNK, val, n)

    _for_sub_blocks(bt, per, n, q_ref.shape[-1], body)


# ----------------------------------------------------------------------------------------------
# Launchers.


@dataclasses.dataclass(frozen=True, eq=False)
class _Packed:
    """A kernel input or output [B, N, H, width] stored as columns of a [B, N, C] array: head h
    is columns [col + h * width, col + (h + 1) * width), read times `scale` and its gradient
    stored times `scale` (`_Cols`). Outputs packed into one array share its ShapeDtypeStruct."""

    array: object
    heads: int
    col: int
    width: int
    scale: float = 1.0

    @property
    def shape(self):
        return (*self.array.shape[:2], self.heads, self.width)

    @property
    def dtype(self):
        return self.array.dtype


def _token_spec(x, grid_rank):
    """[B, N, H, d] array -> [N, d] view of one (b, h); a packed [B, N, C] one (`_Packed`) ->
    [N, C] of one b (the kernel reads its head's columns, `_Cols`); grid (B, H) or (NT, B, H)."""
    x = x.array if isinstance(x, _Packed) else x
    if len(x.shape) == 3:
        shape, index = (None, x.shape[1], x.shape[2]), lambda b, h: (b, 0, 0)
    else:
        shape, index = (None, x.shape[1], None, x.shape[3]), lambda b, h: (b, 0, h, 0)
    if grid_rank == 2:
        return pl.BlockSpec(shape, index)
    return pl.BlockSpec(shape, lambda c, b, h: index(b, h))


def _packed_io(kernel, tokens, n_extra, outs, grid_rank, logits=None):
    """What a pallas_call of `kernel` takes for token inputs and outputs that may be `_Packed`:
    (the kernel on the call's refs, the arrays to pass for `tokens`, the call's outputs).

    `kernel` sees every token input and output as its own [N, d] ref (a `_Cols` view for a packed
    one, of the head of the program's last grid axis), with `logits` applied (`_with_logits`);
    the call passes each packed array as is and writes outputs packed into one array once.
    `n_extra`: inputs after the tokens (states), passed through."""
    if logits is not None:
        kernel = _with_logits(kernel, *logits)
    calls, index = [], []  # the call's outputs; the one each output is written to
    for o in outs:
        array = o.array if isinstance(o, _Packed) else o
        same = [j for j, c in enumerate(calls) if isinstance(o, _Packed) and c is array]
        index.append(same[0] if same else len(calls))
        calls += [] if same else [array]
    arrays = [t.array if isinstance(t, _Packed) else t for t in tokens]
    if not any(isinstance(x, _Packed) for x in (*tokens, *outs)):
        return kernel, arrays, calls

    def view(ref, x, h):
        if not isinstance(x, _Packed):
            return ref
        return _Cols(ref, x.col + h * x.width, x.width, x.scale)

    def wrapped(*refs):
        h = pl.program_id(grid_rank - 1)
        n_in = len(tokens) + n_extra
        ins, outs_ = refs[:n_in], refs[n_in:]
        views = [view(r, t, h) for r, t in zip(ins, tokens, strict=False)]
        views += [
            *ins[len(tokens) :],
            *(view(outs_[j], o, h) for j, o in zip(index, outs, strict=True)),
        ]
        kernel(*views)

    return wrapped, arrays, calls


def _logits(scale, gates, grads=0):
    """The gate-logit setting of one launch: None for log gates (scale None), else (scale,
    positions of the gate inputs, number of trailing outputs that are their gradients)."""
    return None if scale is None else (scale, gates, grads)


def _with_logits(kernel, scale, gates, grads):
    """kernel, with the inputs at `gates` seen as logits (`_Logits`) and its last `grads`
    outputs, the gradients of those gates in order, stored through the chain rule."""

    def wrapped(*refs):
        views = list(refs)
        for i in gates:
            views[i] = _Logits(refs[i], scale)
        if grads:  # gradients of all the gates, in order
            for o, i in zip(range(len(refs) - grads, len(refs)), gates, strict=True):
                views[o] = _LogitGrads(refs[o], refs[i], scale)
        kernel(*views)

    return wrapped


def triton_call(kernel, name, grid, in_specs, out_specs, out_shape, *, num_warps, num_stages,
                interpret):  # fmt: skip
    """`pl.pallas_call` on the Triton backend with its launch settings (also norm_mix's kernels)."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )


def _call(kernel, name, grid, in_specs, out_specs, out_shape, params, warps=None, stages=None):
    settings = dict(
        num_warps=warps or params.num_warps,
        num_stages=stages or params.num_stages,
        interpret=params.interpret,
    )
    return triton_call(kernel, name, grid, in_specs, out_specs, out_shape, **settings)


def _states_span(B, H, nt, params):
    """Chunks per states program, or 0 for the sequential plan (one program per (b, h) walking all
    NT chunks). None in params: split only when B * H < STATE_PROGRAMS, into about SPAN_PROGRAMS
    programs (the chain each program walks shrinks with them)."""
    span = params.states_span
    if span is None:
        if B * H >= STATE_PROGRAMS:
            return 0
        span = math.ceil(nt / math.ceil(SPAN_PROGRAMS / (B * H)))
    return 0 if span >= nt else span


def _span_spec(rows, V):
    """[B, H, NS * rows, V] (or [B, H, NS, rows], V None) -> block of span s; grid (NS, B, H)."""
    if V is None:
        return pl.BlockSpec((None, None, None, rows), lambda s, b, h: (b, h, s, 0))
    return pl.BlockSpec((None, None, rows, V), lambda s, b, h: (b, h, s, 0))


def _states_mm(inputs, adjoints):
    """The matmul dtype of a states launch's inputs (k, v, ... or q, k, v, ...)."""
    return _matmul_dtype(inputs[1].dtype if adjoints else inputs[0].dtype)


def _states_dtype(params, mm):
    """The dtype of the states entering every chunk in HBM (`KernelParams.states_dtype`)."""
    return jnp.dtype(mm) if params.states_dtype == "input" else jnp.dtype(jnp.float32)


def _states_call(inputs, params, kinds, span, ns, init=None, summary=False, logits=None):
    """One launch of the states kernel for the states `kinds`, grid (NS, B, H). Returns the entering
    states of every chunk, [B, H, NS * span * K, V] each, or with `summary` the spans' own leaving
    states [B, H, NS * K, V] and gate totals [B, H, NS, K] (fp32)."""
    adjoints = "dsf" in kinds
    B, N, H, K = inputs[0].shape
    V = inputs[2].shape[-1] if adjoints else inputs[1].shape[-1]
    mm = _states_mm(inputs, adjoints)
    nst = len(kinds)
    rows = K if summary else span * K
    dtype = jnp.float32 if summary else _states_dtype(params, mm)  # summaries feed the XLA scan
    out_shape = [jax.ShapeDtypeStruct((B, H, ns * rows, V), dtype)] * nst
    out_specs = [_span_spec(rows, V)] * nst
    if summary:
        out_shape += [jax.ShapeDtypeStruct((B, H, ns, K), jnp.float32)] * 2
        out_specs += [_span_spec(K, None)] * 2
    kernel = functools.partial(
        _bigla_states_kernel,
        n=N,
        bt=params.chunk,
        span=span,
        mm=mm,
        kinds=kinds,
        has_init=init is not None,
        summary=summary,
    )
    init = tuple(init or ())
    what = "_adjoints" if "sf" not in kinds else ""  # the backward on saved forward states
    name = "bigla_" + ("bwd" if adjoints else "fwd") + what
    name += "_span_summaries" if summary else "_states"
    kernel, arrays, out_shape = _packed_io(kernel, inputs, len(init), out_shape, 3, logits)
    return _call(
        kernel,
        name,
        (ns, B, H),
        [_token_spec(x, 3) for x in inputs] + [_span_spec(K, V)] * len(init),
        out_specs,
        out_shape,
        params,
        stages=params.states_stages,
    )(*arrays, *init)


WALK_V_BLOCK = 16  # columns of V per program of the span walk (a state's columns are independent)
# span_scan="auto": the walk up to this many spans, else XLA. H200, bench_bigla, walk (8 spans per
# iteration) against XLA's scan, forward / forward + backward ms: ViG-T 1024² (16 spans) 0.119 /
# 0.345 against 0.143 / 0.392; 2048² (64 spans) 0.128 / 0.365 against 0.156 / 0.433; 4096² (256)
# 0.238 / 0.688 against 0.281 / 0.764 (commit ffd6c7a). Beyond 256 spans: not measured, XLA.
WALK_MAX_SPANS = 256


def _span_walk_kernel(*refs, ns, reverses, unroll):
    """The states entering every span of one (b, h) and block of V columns, per state: S_0 = 0,
    S_{j+1} = e^{total_j} S_j + own_j, j in the state's direction (right to left if reversed).
    refs: totals [NS, K], owns [NS * K, vb] per state, then the outputs [NS * K, vb]. `unroll`
    spans per loop iteration: their loads first (independent of the chain), then the chain."""
    nst = len(reverses)
    t_refs, u_refs, o_refs = refs[:nst], refs[nst : 2 * nst], refs[2 * nst :]
    K, vb = o_refs[0].shape[0] // ns, o_refs[0].shape[1]

    def steps(first, count, states):  # spans first .. first + count - 1 in walk order
        loaded = []  # per step and state: (rows of span j, its decay [K], its own [K, vb])
        for r in range(count):
            loaded.append([])
            for t_ref, u_ref, reverse in zip(t_refs, u_refs, reverses, strict=True):
                j = ns - 1 - (first + r) if reverse else first + r
                decay = jnp.exp(jnp.sum(t_ref[pl.ds(j, 1), :], axis=0))  # [K], exponent <= 0
                loaded[-1].append((pl.ds(j * K, K), decay, u_ref[pl.ds(j * K, K), :]))
        states = list(states)
        for step in loaded:
            for i, (rows, decay, own) in enumerate(step):
                o_refs[i][rows, :] = states[i]
                states[i] = decay[:, None] * states[i] + own
        return tuple(states)

    groups = ns // unroll
    init = (jnp.zeros((K, vb), jnp.float32),) * nst
    states = lax.fori_loop(0, groups, lambda g, st: steps(g * unroll, unroll, st), init)
    if ns % unroll:  # the last spans, one per iteration
        lax.fori_loop(groups * unroll, ns, lambda it, st: steps(it, 1, st), states)


def _walk_spans(totals, owns, reverses, interpret, stages, unroll=1):
    """`_scan_spans`'s "walk": one Pallas launch, grid (V / vb, B, H), `stages` Triton pipelining
    stages for its loop, `unroll` spans per loop iteration (at 64 spans one span per iteration
    cost more than XLA's scan on an H200, 8 per iteration less: see WALK_MAX_SPANS)."""
    B, H, ns, K, V = owns[0].shape
    vb = min(V, WALK_V_BLOCK)
    nst = len(owns)
    t_spec = pl.BlockSpec((None, None, ns, K), lambda v, b, h: (b, h, 0, 0))
    u_spec = pl.BlockSpec((None, None, ns * K, vb), lambda v, b, h: (b, h, 0, v))
    out_shape = [jax.ShapeDtypeStruct((B, H, ns * K, V), jnp.float32)] * nst
    unroll = min(unroll, ns)
    kernel = functools.partial(_span_walk_kernel, ns=ns, reverses=tuple(reverses), unroll=unroll)
    warps = 1 if unroll == 1 else 4  # registers for the loaded spans
    call = triton_call(
        kernel, "bigla_span_walk", (V // vb, B, H), [t_spec] * nst + [u_spec] * nst,
        [u_spec] * nst, out_shape, num_warps=warps, num_stages=stages, interpret=interpret,
    )  # fmt: skip
    outs = call(*(t.astype(jnp.float32) for t in totals), *(x.reshape(B, H, -1, V) for x in owns))
    return [x.reshape(B, H, ns, K, V) for x in outs]


def _scan_spans(totals, owns, reverses, method, interpret=False, stages=3, unroll=1):
    """States entering every span, from the spans' own leaving states and gate totals.

    owns: [B, H, NS, K, V] each, what every span adds to the state it passes on; totals:
    [B, H, NS, K] each, the log decay (<= 0) a span applies to a state crossing it; reverses: the
    direction of each state. Entering state of span s = sum over the spans j before s in its
    direction of exp(sum of totals of the spans strictly between) owns[j].
    method: "walk" (`_walk_spans`: one Pallas launch, O(NS) work in sequence per program; run in
    interpret mode with `interpret`, `stages` and `unroll` as `_walk_spans`), or in XLA, all
    states through one scan (the reverse ones flipped), so XLA launches its few kernels once:
    "matmul" (O(NS^2) weights and one batched dot: a handful of launches), "associative"
    (`lax.associative_scan`: O(NS) work, ~2 log2(NS) levels of launches), or "xla": matmul while
    NS <= SCAN_MATMUL_MAX_SPANS, else associative. "auto": walk while NS <= WALK_MAX_SPANS, else
    "xla".
    """
    methods = ("auto", "walk", "xla", "matmul", "associative")
    if method not in methods:
        raise ValueError(f"span_scan={method!r} is not one of {methods}")
    ns = owns[0].shape[2]
    if method == "auto":
        method = "walk" if ns <= WALK_MAX_SPANS else "xla"
    if method == "walk":
        return _walk_spans(totals, owns, reverses, interpret, stages, unroll)
    flip = lambda x, r: jnp.flip(x, axis=2) if r else x
    g = jnp.stack([flip(t, r) for t, r in zip(totals, reverses, strict=True)])  # [S, B, H, NS, K]
    u = jnp.stack([flip(x, r) for x, r in zip(owns, reverses, strict=True)])  # [S, B, H, NS, K, V]
    if method == "xla":
        method = "matmul" if ns <= SCAN_MATMUL_MAX_SPANS else "associative"
    if method == "matmul":
        # seg[j, t] = sum of g over the spans i with j < i <= t: a cumsum of non-positive terms
        # within the segment only (no difference of two long cumsums, hence no cancellation).
        idx = jnp.arange(ns)
        after = (idx[None, :] > idx[:, None])[:, :, None]  # [NS(j), NS(t), 1]: t after j
        seg = jnp.cumsum(jnp.where(after, g[..., None, :, :], 0.0), axis=-2)  # [S, B, H, j, t, K]
        # Decay from span j's exit to span s's entry: seg[j, s - 1], for s after j only.
        seg = jnp.pad(seg, [(0, 0)] * 4 + [(1, 0), (0, 0)])[..., :-1, :]
        w = jnp.exp(jnp.where(after, seg, -jnp.inf))  # [S, B, H, j, s, K]
        entering = jnp.einsum("...jsk,...jkv->...skv", w, u, precision=lax.Precision.HIGHEST)
    elif method == "associative":

        def combine(a, b):  # a: the earlier run of spans in the direction, b: the later one
            return a[0] + b[0], jnp.exp(b[0])[..., None] * a[1] + b[1]

        _, leaving = lax.associative_scan(combine, (g, u), axis=3)
        entering = jnp.concatenate([jnp.zeros_like(leaving[:, :, :, :1]), leaving[:, :, :, :-1]], 3)
    return [flip(entering[i], r) for i, r in enumerate(reverses)]


def _states(inputs, params, adjoints, logits=None, fwd_states=True):
    """Entering states of every chunk: Sf, Sb (and dSf, dSb; without `fwd_states` dSf, dSb only),
    [B, H, NT * K, V] each in `_states_dtype`.

    Sequential plan (span 0): one program per (b, h) walks all NT chunks. Split plan: spans of
    `span` chunks; a summary launch gives every span's own leaving states and gate totals, a scan
    over spans in XLA gives the states entering every span, and a second launch walks each span
    from its entering states (span 1: the scan's states are already those of every chunk).
    """
    kinds = _state_kinds(adjoints, fwd_states)
    B, N, H, K = inputs[0].shape
    V = inputs[2].shape[-1] if adjoints else inputs[1].shape[-1]
    nt = math.ceil(N / params.chunk)
    span = _states_span(B, H, nt, params)
    call = functools.partial(_states_call, inputs, params, kinds, logits=logits)
    if not span:
        return call(span=nt, ns=1)
    ns = math.ceil(nt / span)
    *own, total_f, total_b = call(span, ns, summary=True)
    # Sf and dSf decay by gf, Sb and dSb by gb.
    init = _scan_spans(
        [total_f if kind in ("sf", "dsf") else total_b for kind in kinds],
        [x.reshape(B, H, ns, K, V) for x in own],
        [_REVERSE[kind] for kind in kinds],
        params.span_scan,
        params.interpret,
        params.states_stages or params.num_stages,
        params.walk_unroll,
    )
    init = [x.reshape(B, H, ns * K, V) for x in init]
    if span == 1:
        return [x.astype(_states_dtype(params, _states_mm(inputs, adjoints))) for x in init]
    states = call(span, ns, init=init)
    # A last span past NT leaves padding chunks; the chunk kernels get exactly NT chunks. Compiled
    # on an H200, the float32 backward sub-block kernel returned wrong dk and dgb (16% off) from
    # states arrays one chunk longer (span 3 at NT = 512; bf16, interpret mode and NT-chunk
    # arrays were right).
    return [x[:, :, : nt * K] for x in states] if ns * span > nt else states


def _state_spec(K, V, per_chunk=1):
    """[B, H, NTp * K, V] -> the state of the program's chunk; grid (NT * per_chunk, B, H)."""
    return pl.BlockSpec((None, None, K, V), lambda c, b, h: (b, h, c // per_chunk, 0))


def _launch(
    kernel, name, params, tokens, outs, states=(), logits=None, sub=False, warps=None, **statics
):
    """One launch of a token-layout kernel: grid (B, H) without states (short plan), (NT, B, H)
    with the chunks' states (long plan), or with `sub` (ceil(N / 16 / subs_per_program), B, H),
    programs of `subs_per_program` sub-blocks. tokens: [B, N, H, d] arrays (or `_Packed`), then
    states [B, H, NTp * K, V]; outs: [B, N, H, d] ShapeDtypeStructs (or `_Packed` ones). Returns
    the list of the call's outputs (outputs packed into one array: that array, once)."""
    B, N, H, K = tokens[0].shape
    rank = 3 if states else 2
    rows = SUB_CHUNK if sub else params.chunk
    per = params.subs_per_program if sub else 1
    grid = (math.ceil(math.ceil(N / rows) / per), B, H) if states else (B, H)
    in_specs = [_token_spec(x, rank) for x in tokens]
    if per > 1:  # every chunk's states of the program's (b, h)
        whole = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda c, b, h: (b, h, 0, 0))
        in_specs += [whole(x) for x in states]
    else:
        in_specs += [_state_spec(K, x.shape[-1], params.chunk // rows) for x in states]
    if states:  # the long plan's chunk kernels
        statics["lean"] = params.lean_states
    if sub:
        statics["per"] = per
    kernel = functools.partial(
        kernel,
        n=N,
        bt=params.chunk,
        mm=_matmul_dtype(tokens[0].dtype),
        exact=params.exact_diagonal,
        **statics,
    )
    kernel, arrays, out_shape = _packed_io(kernel, tokens, len(states), outs, rank, logits)
    out_specs = [_token_spec(x, rank) for x in out_shape]
    call = _call(kernel, name, grid, in_specs, out_specs, out_shape, params, warps)
    return call(*arrays, *states)


def _gates_in(g, scale):
    """Gates as the kernels read them: log gates in bf16 as they come (the kernels upcast every
    load; their gradients are then written in bf16), other log gates in fp32; logits (scale set)
    as they come. Packed log gates come in fp32 or bf16 (`bigla_pallas_packed`)."""
    if scale is not None or isinstance(g, _Packed) or g.dtype == jnp.bfloat16:
        return g
    return g.astype(jnp.float32)


def _grad_outs(inputs):
    """The backward's outputs: one per input ([B, N, H, d], its dtype), or for packed inputs
    packed alike into one array per input array."""
    arrays, outs = {}, []
    for x in inputs:
        if isinstance(x, _Packed):
            array = jax.ShapeDtypeStruct(x.array.shape, x.array.dtype)
            outs.append(dataclasses.replace(x, array=arrays.setdefault(id(x.array), array)))
        else:
            outs.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    return outs


def _bigla_fwd(q, k, v, gf, gb, params, scale):
    """(o, states): o [B, N, H, V] in v.dtype; states (Sf, Sb) entering every chunk on the long
    plan, () on the short one. scale None: gf, gb are log gates; else logits, gates
    log_sigmoid(x) * scale."""
    gf, gb = _gates_in(gf, scale), _gates_in(gb, scale)
    tokens = (q, k, v, gf, gb)
    out = [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    logits = _logits(scale, (3, 4))
    if _use_short_path(q.shape[1], params):
        (o,) = _launch(_bigla_fwd_short_kernel, "bigla_fwd_short", params, tokens, out, (), logits)
        return o, ()
    states = _states((k, v, gf, gb), params, False, _logits(scale, (2, 3)))
    if params.sub_blocks:
        kernel, name = _bigla_fwd_sub_kernel, "bigla_fwd_sub_blocks"
    else:
        kernel, name = _bigla_fwd_chunk_kernel, "bigla_fwd_chunks"
    (o,) = _launch(
        kernel, name, params, tokens, out, states, logits, params.sub_blocks, params.fwd_warps
    )
    return o, tuple(states)


def _bigla_bwd(q, k, v, gf, gb, do, params, scale, saved=()):
    """(dq, dk, dv, dgf, dgb) with the shapes and dtypes of the inputs (dgf, dgb: gradients of
    the logits when `scale` is set), or for `_Packed` inputs their arrays' gradients (dqkv,
    dgates). saved: the forward's (Sf, Sb) (`save_states`), or ()."""
    outs = _grad_outs((q, k, v, gf, gb))
    tokens = (q, k, v, _gates_in(gf, scale), _gates_in(gb, scale), do.astype(v.dtype))
    logits = _logits(scale, (3, 4), 2)
    if _use_short_path(q.shape[1], params):
        return _launch(_bigla_bwd_short_kernel, "bigla_bwd_short", params, tokens, outs, (), logits)
    states_logits = _logits(scale, (3, 4))
    if saved:
        states = [*saved, *_states(tokens, params, True, states_logits, fwd_states=False)]
    else:
        states = _states(tokens, params, True, states_logits)
    if params.sub_blocks:
        return _launch(
            _bigla_bwd_sub_kernel, "bigla_bwd_sub_blocks", params, tokens, outs, states, logits,
            sub=True, warps=params.bwd_warps,
        )  # fmt: skip
    if not _split_backward(q.shape[-1], params):
        return _launch(
            _bigla_bwd_chunk_kernel, "bigla_bwd_chunks", params, tokens, outs, states, logits,
            warps=params.bwd_warps,
        )  # fmt: skip
    # One launch per direction: the first writes fp32 partials of dq, dk, dv; the second adds.
    q, k, v, gf, gb, do = tokens
    sf, sb, dsf, dsb = states
    partial = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in outs[:3]]
    launch = functools.partial(_launch, _bigla_bwd_dir_kernel, params=params)
    logits = _logits(scale, (3,), 1)
    dq_p, dk_p, dv_p, dgf = launch(
        name="bigla_bwd_chunks_forward_dir",
        tokens=(q, k, v, gf, do),
        outs=[*partial, outs[3]],
        states=(sf, dsf),
        logits=logits,
        reverse=False,
    )
    dq, dk, dv, dgb = launch(
        name="bigla_bwd_chunks_backward_dir",
        tokens=(q, k, v, gb, do, dq_p, dk_p, dv_p),
        outs=[*outs[:3], outs[4]],
        states=(sb, dsb),
        logits=logits,
        reverse=True,
    )
    return dq, dk, dv, dgf, dgb


def _params(params, chunk_size, interpret, save_states=True):
    """The launch settings: `params` if given, else the defaults at chunk_size (if set)."""
    if params is not None:
        return params
    chunk = {} if chunk_size is None else {"chunk": chunk_size}
    return KernelParams(interpret=interpret, save_states=save_states, **chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _bigla(q, k, v, gf, gb, params, scale):
    return _bigla_fwd(q, k, v, gf, gb, params, scale)[0]


def _bigla_vjp_fwd(q, k, v, gf, gb, params, scale):
    o, states = _bigla_fwd(q, k, v, gf, gb, params, scale)
    return o, ((q, k, v, gf, gb), states if params.save_states else ())


def _bigla_vjp_bwd(params, scale, residuals, do):
    inputs, saved = residuals
    return tuple(_bigla_bwd(*inputs, do, params, scale, saved))


_bigla.defvjp(_bigla_vjp_fwd, _bigla_vjp_bwd)


def _unpack(qkv, gates, layout):
    """q, k, v, gf, gb as `_Packed` columns of qkv [B, N, H (2K + V)] ([q | k | v], each
    head-major) and gates [B, N, 2 H K] ([gf | gb]); layout (H, K, V, q_scale)."""
    H, K, V, q_scale = layout
    hk = H * K
    return (
        _Packed(qkv, H, 0, K, q_scale),
        _Packed(qkv, H, hk, K),
        _Packed(qkv, H, 2 * hk, V),
        _Packed(gates, H, 0, K),
        _Packed(gates, H, hk, K),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bigla_packed(qkv, gates, params, scale, layout):
    return _bigla_fwd(*_unpack(qkv, gates, layout), params, scale)[0]


def _bigla_packed_vjp_fwd(qkv, gates, params, scale, layout):
    o, states = _bigla_fwd(*_unpack(qkv, gates, layout), params, scale)
    return o, ((qkv, gates), states if params.save_states else ())


def _bigla_packed_vjp_bwd(params, scale, layout, residuals, do):
    (qkv, gates), saved = residuals
    return tuple(_bigla_bwd(*_unpack(qkv, gates, layout), do, params, scale, saved))


_bigla_packed.defvjp(_bigla_packed_vjp_fwd, _bigla_packed_vjp_bwd)


def split_packed(qkv, gates, num_heads, key_dim, q_scale=1.0):
    """(q, k, v, gf, gb) as [B, N, H, d] arrays from packed qkv and gates (`bigla_pallas_packed`),
    q times q_scale in qkv's dtype: what XLA hands the unpacked entry points."""
    B, N, _ = qkv.shape
    H = num_heads
    q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
    q = q * jnp.asarray(q_scale, qkv.dtype)
    gf, gb = jnp.split(gates, 2, axis=-1)
    return tuple(x.reshape(B, N, H, x.shape[-1] // H) for x in (q, k, v, gf, gb))


def check_packed(qkv, gates, num_heads, key_dim):
    """(K, V) per head of packed qkv [B, N, 2 key_dim + H V] and gates [B, N, 2 key_dim]; a
    one-line ValueError on anything else."""
    if qkv.ndim != 3 or gates.ndim != 3 or gates.shape != (*qkv.shape[:2], 2 * key_dim):
        raise ValueError(
            f"need qkv [B, N, 2 key_dim + value_dim] and gates [B, N, 2 key_dim] with {key_dim=}; "
            f"got {qkv.shape=}, {gates.shape=}"
        )
    value_dim = qkv.shape[-1] - 2 * key_dim
    if num_heads < 1 or key_dim % num_heads or value_dim < 1 or value_dim % num_heads:
        raise ValueError(
            f"{key_dim=} and value_dim={value_dim} (qkv width {qkv.shape[-1]} - 2 key_dim) must "
            f"be positive multiples of num_heads={num_heads}"
        )
    return key_dim // num_heads, value_dim // num_heads


def bigla_pallas_packed(
    qkv, gates, *, num_heads, key_dim, q_scale=1.0, normalizer=None, chunk_size=None,
    interpret=False, params=None,
):  # fmt: skip
    """`bigla_pallas` (or with `normalizer`, `bigla_pallas_logits`) on q, k, v and the gates read
    in place from the arrays a model's projections produce: no XLA pass slices them apart, and
    the backward writes dqkv and dgates as single arrays (no concatenation).

    Args:
      qkv: [B, N, 2 key_dim + H V] = [q | k | v], each head-major (channel = head * d + i).
      gates: [B, N, 2 key_dim] = [gf | gb] log gates (bf16 read as stored, other dtypes as
        float32), or logits with `normalizer` (any float dtype).
      num_heads: H; key_dim: H K.
      q_scale: q is read as q * q_scale rounded to qkv's dtype (ViG: K^-1/2), and its gradient
        scaled alike.
      normalizer: None for log gates; else gates are log_sigmoid(x) / normalizer.
      chunk_size, interpret, params: as `bigla_pallas`.

    Returns:
      o: [B, N, H, V] in qkv.dtype.

    Raises:
      ValueError: on inconsistent shapes, unsupported K, V or chunk size, or a normalizer <= 0.
    """
    K, V = check_packed(qkv, gates, num_heads, key_dim)
    params = _params(params, chunk_size, interpret)
    scale = None
    if normalizer is not None:
        if not normalizer > 0:
            raise ValueError(f"normalizer={normalizer!r} must be positive")
        scale = 1.0 / float(normalizer)
    gates = _gates_in(gates, scale)
    layout = (num_heads, K, V, float(q_scale))
    if not params.sub_blocks and _split_backward(K, params):
        # The split backward's two launches would each write half of a packed gradient array.
        q, k, v, gf, gb = split_packed(qkv, gates, num_heads, key_dim, q_scale)
        _check(q, v, params)
        return _bigla(q, k, v, gf, gb, params, scale)
    q, _, v, _, _ = _unpack(qkv, gates, layout)
    _check(q, v, params)
    return _bigla_packed(qkv, gates, params, scale, layout)


def bigla_pallas(q, k, v, gf, gb, *, chunk_size=None, interpret=False, params=None):
    """BiGLA o = (o_fwd + o_bwd) / 2 with the fused Pallas kernels; differentiable (custom_vjp).

    Args:
      q, k: [B, N, H, K], K in (16, 32, 64, 128); float16, bfloat16 or float32 (the matmul dtype).
      v: [B, N, H, V], V in (16, 32, 64, 128), same dtype as q.
      gf, gb: [B, N, H, K] log-space gates (<= 0), any float dtype; bf16 is read as stored
        (half the gate traffic of float32, and dgf, dgb are written in bf16), others as float32;
        the arithmetic is float32 either way.
      chunk_size: BT, rows per chunk (power of two >= 16); None: `KernelParams().chunk`.
      interpret: Pallas interpret mode (CPU).
      params: full `KernelParams` (overrides chunk_size and interpret); for tests and benchmarks.

    Returns:
      o: [B, N, H, V] in v.dtype, accumulated in float32.

    Raises:
      ValueError: on unsupported K, V or chunk size.
    """
    params = _params(params, chunk_size, interpret)
    _check(q, v, params)
    return _bigla(q, k, v, gf, gb, params, None)


def bigla_pallas_logits(
    q, k, v, xf, xb, *, normalizer=16.0, chunk_size=None, interpret=False, params=None
):
    """`bigla_pallas` with the gates computed in the kernels from their logits:
    gf = log_sigmoid(xf) / normalizer, gb likewise (ViG: normalizer 16), in float32.

    The [B, N, H, K] float32 gate tensors are then neither written by XLA nor read by the kernels:
    bfloat16 logits halve the gate traffic and give the gates of an XLA log_sigmoid of the same
    logits upcast to float32 (notes_bigla.md, v6b, for their precision). Gradients of xf, xb
    come back in their dtypes.

    Args:
      q, k, v: as `bigla_pallas`.
      xf, xb: [B, N, H, K] gate logits, any float dtype.
      normalizer: positive; the log gates are log_sigmoid(x) / normalizer.
      chunk_size, interpret, params: as `bigla_pallas`.

    Returns:
      o: [B, N, H, V] in v.dtype.

    Raises:
      ValueError: on unsupported K, V or chunk size, or a normalizer <= 0.
    """
    params = _params(params, chunk_size, interpret)
    _check(q, v, params)
    if not normalizer > 0:
        raise ValueError(f"normalizer={normalizer!r} must be positive")
    return _bigla(q, k, v, xf, xb, params, 1.0 / float(normalizer))
