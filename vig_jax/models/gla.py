"""Gated linear attention with 2D locality injection (docs/architecture.md, "The GLA layer").

The only model file that calls BiGLA. Shared by plain ViG (GatedLinearAttention in the official
vig.py) and ViG-H (GLA2D in vig_h.py): the math is the same, only the initialisation differs.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from pallas_kernels.bigla import bigla
from vig_jax.models.layers import RMSNorm, stats_dtype, trunc_normal, xavier_uniform

GATE_LOW_RANK = 16  # gk_proj: D -> 16 -> 2 * key_dim
GATE_LOGIT_NORMALIZER = 16.0  # gates = log_sigmoid(.) / 16
XAVIER_GAIN = 2**-2.5
NORM_EPS = 1e-6


class GatedLinearAttention(nn.Module):
    """xs = DWConv3x3(x); o = BiGLA(q, k, v, gates); RMSNorm(o) and RMSNorm(xs) mixed by a gate.

    Widths: key_dim = D/2 and value_dim = D in total; per head K = D/(2H), V = D/H; every head split
    is head-major (channel = head * K + i), as in the official `rearrange(..., '(h d)')`.

    Attributes:
      num_heads: H; D must be divisible by 2H.
      use_act_in_conv: SiLU after the depthwise conv (ViG-T).
      use_out_act: SiLU before the output projection (ViG-T).
      xavier_init: True in plain ViG (the layer initialises its projections with xavier_uniform,
        gain 2^-2.5); False in ViG-H, whose model re-initialises every Linear with
        trunc_normal(0.02) so that only the depthwise conv keeps xavier.
      bigla_impl, bigla_interpret: passed to `pallas_kernels.bigla.bigla` as impl / interpret.
      dtype: compute dtype; gates are computed in float32 (float64 when computing in float64).
    """

    num_heads: int
    use_act_in_conv: bool
    use_out_act: bool
    xavier_init: bool
    bigla_impl: str
    bigla_interpret: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, h, w, D] -> [B, h, w, D]."""
        B, h, w, D = x.shape
        H = self.num_heads
        if D % (2 * H):
            raise ValueError(f"width D={D} must be divisible by 2 * num_heads = {2 * H}")
        N, key_dim = h * w, D // 2
        K, V = key_dim // H, D // H
        xavier = xavier_uniform(XAVIER_GAIN)
        proj_init = xavier if self.xavier_init else trunc_normal(0.02)

        def dense(features, name, use_bias=False):
            return nn.Dense(
                features, use_bias=use_bias, kernel_init=proj_init, dtype=self.dtype, name=name
            )

        xs = nn.Conv(
            D,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=D,
            use_bias=False,
            kernel_init=xavier,
            dtype=self.dtype,
            name="dwconv",
        )(x)
        if self.use_act_in_conv:
            xs = nn.silu(xs)
        xs = xs.reshape(B, N, D)  # row-major tokens

        qkv = dense(2 * key_dim + D, "qkv")(xs)  # [B, N, 2 key_dim + D] = [q | k | v]
        q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
        q = q.reshape(B, N, H, K) * jnp.asarray(K**-0.5, self.dtype)
        k = k.reshape(B, N, H, K)
        v = v.reshape(B, N, H, V)

        gates = dense(2 * key_dim, "gate_up", use_bias=True)(dense(GATE_LOW_RANK, "gate_down")(xs))
        # log_sigmoid of low-precision logits loses the small gates that matter most: float32.
        gates = jax.nn.log_sigmoid(gates.astype(stats_dtype(self.dtype))) / GATE_LOGIT_NORMALIZER
        gf, gb = (g.reshape(B, N, H, K) for g in jnp.split(gates, 2, axis=-1))

        o = bigla(q, k, v, gf, gb, impl=self.bigla_impl, interpret=self.bigla_interpret)
        o = RMSNorm(NORM_EPS, self.dtype, name="o_norm")(o)  # [B, N, H, V]
        local = RMSNorm(NORM_EPS, self.dtype, name="local_norm")(xs.reshape(B, N, H, V))
        mix = nn.sigmoid(dense(D, "mix_gate", use_bias=True)(xs)).reshape(B, N, H, V)
        o = (o * mix + local * (1 - mix)).reshape(B, N, D)
        if self.use_out_act:
            o = nn.silu(o)
        return dense(D, "out")(o).reshape(B, h, w, D)
