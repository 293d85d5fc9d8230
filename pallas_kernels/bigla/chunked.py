"""BiGLA in chunked form, pure jnp (docs/kernel.md, "Chunked form").

The portable path (CPU, TPU, any GPU) and the XLA baseline of the Pallas kernel. Tokens are cut into
NT chunks of C; per chunk, with G the in-chunk cumulative log gate of each direction,
  o = ½ [ (A_f + A_b) v  +  (q ⊙ e^{G_f}) S_f,in  +  (q ⊙ e^{G_b}) S_b,in ]
where A_f[t, s] = Σ_k q_tk k_sk e^{G_f,tk − G_f,sk} for s ≤ t, A_b the same with G_b for s ≥ t (the
diagonal t = s counts in both directions, as the spec wants), and S_in the state entering the chunk
from the left (forward) or from the right (backward), carried across chunks by one `lax.scan`.

Stability: every exponent is ≤ 0, so no exp ever overflows, however negative the gates. In-chunk
scores use fla's secondary chunking: sub-blocks of L (16) rows; a pair (t, s) in different
sub-blocks goes through the reference row r of t's sub-block (q_t e^{G_t − G_r} · k_s e^{G_r − G_s},
each factor ≤ 1); a pair in the same sub-block gets its exact exp. Masks select the exponent before
the exp (`where`, never a 0/1 factor), so no exp sees a positive argument and neither the values nor
the autodiff gradients meet inf · 0.

Differentiated by plain JAX autodiff. Padding to a multiple of C uses q = k = v = 0, g = 0, which is
neutral in both directions: padded tokens sit after the last real one, add nothing to any state and
do not decay it.
"""

import jax.numpy as jnp
from jax import lax

_SUB_BLOCK = 16  # rows of a diagonal sub-block: [L, L, K] exact exps per sub-block, as fla
_HIGHEST = lax.Precision.HIGHEST  # fp32/fp64 matmuls stay IEEE on GPU (no TF32)


def _sub_block(chunk_size):
    """Largest divisor of chunk_size that is ≤ 16 (any chunk size works; 16 for the usual ones)."""
    return max(d for d in range(1, min(chunk_size, _SUB_BLOCK) + 1) if chunk_size % d == 0)


def _to_chunks(x, chunk_size, dtype):
    """[B, N, H, X] -> [B, NT, H, C, X] in dtype, zero-padded at the end to NT·C tokens."""
    B, N, H, X = x.shape
    NT = -(-N // chunk_size)
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, NT * chunk_size - N), (0, 0), (0, 0)))
    return x.reshape(B, NT, chunk_size, H, X).swapaxes(2, 3)


def _in_chunk_scores(q, k, Gf, Gb, L):
    """Intra-chunk scores of both directions, A = A_f + A_b.

    Args:
      q, k, Gf, Gb: [B, NT, H, C, K] in the accumulation dtype; Gf (Gb) is the inclusive (reverse)
        in-chunk cumsum of the forward (backward) gate.
      L: sub-block size, divides C.

    Returns:
      A: [B, NT, H, C, C] in the accumulation dtype; A[t, s] pairs query t with key s.
    """
    *lead, C, K = q.shape
    S = C // L
    qs, ks, Gfs, Gbs = (x.reshape(*lead, S, L, K) for x in (q, k, Gf, Gb))  # [B, NT, H, S, L, K]

    # Diagonal sub-blocks, exact, one exp per pair: e^{Gf_a − Gf_b} for key b before query a,
    # e^{Gb_a − Gb_b} for b after a (both exponents ≤ 0), and 1 + 1 on the diagonal.
    a = jnp.arange(L)
    before = (a[None, :] < a[:, None])[..., None]  # [L(a), L(b), 1]
    after = (a[None, :] > a[:, None])[..., None]
    dGf = Gfs[..., :, None, :] - Gfs[..., None, :, :]  # [B, NT, H, S, L(a), L(b), K]
    dGb = Gbs[..., :, None, :] - Gbs[..., None, :, :]
    diag = jnp.eye(L, dtype=q.dtype)[..., None]
    w = jnp.exp(jnp.where(before, dGf, jnp.where(after, dGb, 0))) + diag
    # Elementwise in the accumulation dtype (fla warns against bf16 here), reduced over K.
    A_diag = jnp.sum(qs[..., :, None, :] * w * ks[..., None, :, :], axis=-1)  # [B, NT, H, S, L, L]
    eye = jnp.eye(S, dtype=A_diag.dtype)[:, None, :, None]  # [S, 1, S, 1]
    A = (A_diag[..., :, :, None, :] * eye).reshape(*lead, C, C)  # block diagonal
    if S == 1:
        return A

    # Off-diagonal: reference row r = first row of the query sub-block in the forward direction
    # (keys from earlier sub-blocks), its last row in the backward one (keys from later sub-blocks).
    Gf_r = Gfs[..., :, 0, :]  # [B, NT, H, S, K]
    Gb_r = Gbs[..., :, -1, :]
    q_off = jnp.concatenate(
        [qs * jnp.exp(Gfs - Gf_r[..., None, :]), qs * jnp.exp(Gbs - Gb_r[..., None, :])], axis=-1
    )  # [B, NT, H, S, L, 2K]
    key_block = jnp.arange(C) // L
    before = (key_block[None, :] < jnp.arange(S)[:, None])[..., None]  # [S, C, 1]
    after = (key_block[None, :] > jnp.arange(S)[:, None])[..., None]
    dGf = Gf_r[..., :, None, :] - Gf[..., None, :, :]  # [B, NT, H, S, C, K]
    dGb = Gb_r[..., :, None, :] - Gb[..., None, :, :]
    # One exp per (sub-block, key): a key is before or after the query sub-block, never both; the
    # sub-block's own keys get e^0 here and are zeroed by the `where`s below (finite values only).
    k_dec = k[..., None, :, :] * jnp.exp(jnp.where(before, dGf, jnp.where(after, dGb, 0)))
    k_off = jnp.concatenate([jnp.where(before, k_dec, 0), jnp.where(after, k_dec, 0)], axis=-1)
    A_off = jnp.einsum("...ilk,...isk->...ils", q_off, k_off, precision=_HIGHEST)  # [.., S, L, C]
    return A + A_off.reshape(*lead, C, C)


def _states_in(decay, u):
    """States entering each chunk: forward from the left, backward from the right.

    Args:
      decay: [2, B, NT, H, K], e^{total log gate of the chunk} per direction (forward, backward).
      u: [2, B, NT, H, K, V], what the chunk adds to the state leaving it, per direction.

    Returns:
      [2, B, NT, H, K, V]: S_in[0, :, c] = forward state after chunk c − 1 (0 for c = 0);
      S_in[1, :, c] = backward state after chunk c + 1 (0 for the last chunk).
    """

    def bwd_reversed(x):  # chunk order of the backward direction flipped, so one scan serves both
        return jnp.stack([x[0], jnp.flip(x[1], axis=1)])

    def step(state, xs):  # state: [2, B, H, K, V]
        decay_c, u_c = xs
        return decay_c[..., None] * state + u_c, state

    xs = tuple(jnp.moveaxis(bwd_reversed(x), 2, 0) for x in (decay, u))  # NT leading
    _, s_in = lax.scan(step, jnp.zeros_like(u[:, :, 0]), xs)  # [NT, 2, B, H, K, V]
    return bwd_reversed(jnp.moveaxis(s_in, 0, 2))


def bigla_chunked(q, k, v, gf, gb, *, chunk_size=64):
    """BiGLA, o = (o_fwd + o_bwd) / 2, in chunked form; same arrays in and out as `bigla_reference`.

    Args:
      q, k: [B, N, H, K], same float dtype as v.
      v: [B, N, H, V].
      gf, gb: [B, N, H, K] log-space gates (≤ 0) of the forward and backward recurrences, any float
        dtype (computed in the accumulation dtype).
      chunk_size: C, tokens per chunk; any N is padded to a multiple of C internally.

    Returns:
      o: [B, N, H, V] in the dtype of v. Everything inside (cumsums, scores, states, matmul
      operands) is float32, float64 for float64 inputs.
    """
    out_dtype = v.dtype
    # float16/bfloat16 inputs are upcast whole, matmul operands included: XLA:CPU has no
    # bf16 x bf16 -> f32 dot, and at ViG's sizes (C x C x K per chunk) this path is bound by memory
    # and elementwise work, not by matmul throughput.
    acc = jnp.promote_types(v.dtype, jnp.float32)
    B, N, H, _ = q.shape
    C = chunk_size

    q, k, v, gf, gb = (_to_chunks(x, C, acc) for x in (q, k, v, gf, gb))  # [B, NT, H, C, K|V]
    Gf = jnp.cumsum(gf, axis=3)  # inclusive: Gf_t − Gf_s = Σ_{s<r≤t} gf_r
    Gb = lax.cumsum(gb, axis=3, reverse=True)  # inclusive reverse: Gb_t − Gb_s = Σ_{t≤r<s} gb_r

    A = _in_chunk_scores(q, k, Gf, Gb, _sub_block(C))  # [B, NT, H, C, C]

    # Chunk totals: forward decays over the whole chunk to its last row, backward to its first row.
    Gf_last, Gb_first = Gf[..., -1:, :], Gb[..., :1, :]  # [B, NT, H, 1, K]
    decay = jnp.exp(jnp.stack([Gf_last[..., 0, :], Gb_first[..., 0, :]]))  # [2, B, NT, H, K]
    # Keys decayed to the chunk's end in their direction: what they add to the state leaving it.
    k_end = jnp.stack(
        [k * jnp.exp(Gf_last - Gf), k * jnp.exp(Gb_first - Gb)]
    )  # [2, B, NT, H, C, K]
    u = jnp.einsum("d...ck,...cv->d...kv", k_end, v, precision=_HIGHEST)  # [2, B, NT, H, K, V]
    s_in = _states_in(decay, u)  # [2, B, NT, H, K, V]
    # Intra-chunk and state terms as ONE matmul: [A | q e^Gf | q e^Gb] @ [v; S_f,in; S_b,in].
    # (Also a workaround: XLA:CPU in jax 0.10.2 returned garbage under jit for `A v + q_in S_in`
    # written as an add of two einsums when NT = 1.)
    lhs = jnp.concatenate([A, q * jnp.exp(Gf), q * jnp.exp(Gb)], axis=-1)  # [B, NT, H, C, C+2K]
    rhs = jnp.concatenate([v, s_in[0], s_in[1]], axis=-2)  # [B, NT, H, C+2K, V]
    o = jnp.einsum("...tj,...jv->...tv", lhs, rhs, precision=_HIGHEST)  # [B, NT, H, C, V]

    o = (o / 2).swapaxes(2, 3).reshape(B, -1, H, o.shape[-1])[:, :N]  # [B, N, H, V]
    return o.astype(out_dtype)
