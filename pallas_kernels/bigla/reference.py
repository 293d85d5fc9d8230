"""BiGLA straight from the recurrence (docs/architecture.md, "BiGLA"): the definition of correct.

Per batch element and head, with states S in R^{K x V}:
  forward   S_f[t] = diag(exp(gf[t])) S_f[t-1] + k[t]^T v[t],  o_f[t] = q[t] S_f[t]  (left to right)
  backward  S_b[t] = diag(exp(gb[t])) S_b[t+1] + k[t]^T v[t],  o_b[t] = q[t] S_b[t]  (right to left)
  o = (o_f + o_b) / 2            (token t sees itself in both directions)
"""

import jax.numpy as jnp
from jax import lax


def bigla_reference(q, k, v, gf, gb):
    """One `lax.scan` over tokens per direction; accumulates in float32 (float64 for float64 input).

    Args:
      q, k: [B, N, H, K].
      v: [B, N, H, V].
      gf, gb: [B, N, H, K] log-space gates (<= 0) of the forward and backward recurrences.

    Returns:
      o: [B, N, H, V] in the dtype of v.
    """
    acc = jnp.promote_types(v.dtype, jnp.float32)
    q, k, v, gf, gb = (x.astype(acc) for x in (q, k, v, gf, gb))
    B, _, H, K = q.shape
    V = v.shape[-1]

    def one_direction(g, reverse):
        def step(state, inputs):  # state: [B, H, K, V]
            q_t, k_t, v_t, g_t = inputs  # [B, H, K], [B, H, K], [B, H, V], [B, H, K]
            state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
            o_t = jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=lax.Precision.HIGHEST)
            return state, o_t

        tokens_first = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))  # [N, B, H, *]
        _, o = lax.scan(step, jnp.zeros((B, H, K, V), acc), tokens_first, reverse=reverse)
        return jnp.moveaxis(o, 0, 1)  # [B, N, H, V]

    o = (one_direction(gf, reverse=False) + one_direction(gb, reverse=True)) / 2
    return o.astype(v.dtype)
