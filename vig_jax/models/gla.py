"""Gated linear attention with 2D locality injection (docs/architecture.md, "The GLA layer").

The only model file that calls BiGLA. Shared by plain ViG (GatedLinearAttention in the official
vig.py) and ViG-H (GLA2D in vig_h.py): the math is the same, only the initialisation differs.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import FrozenDict
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.bigla import bigla, bigla_logits, bigla_packed
from pallas_kernels.norm_mix import norm_mix
from vig_jax.models.layers import (
    DenseParams,
    DepthwiseConv3x3,
    NormScale,
    RMSNorm,
    linear,
    stats_dtype,
    trunc_normal,
    xavier_uniform,
)
from vig_jax.models.stack import BIGLA_OUTPUT

# The GatedLinearAttention fields a model passes through unchanged to every GLA layer (BiGLA's
# implementation and settings, and the layer's execution forms); ViG and ViG-H have each as a field.
LAYER_FORMS = (
    "bigla_impl",
    "bigla_interpret",
    "fused_proj",
    "split_proj",
    "dwconv",
    "fp32_mix",
    "gates_in_kernel",
    "compact_gates",
    "mix_apart",
    "save_states",
    "bigla_chunk",
    "packed_bigla",
)


def layer_forms(model: nn.Module) -> FrozenDict:
    """{field: value} of LAYER_FORMS read off a model, for its blocks' GLA layers."""
    return FrozenDict({name: getattr(model, name) for name in LAYER_FORMS})


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
      fused_proj: the three projections that read xs (qkv, gate_down, mix_gate) as one matmul
        against their kernels concatenated at run time (same parameters).
      split_proj: the other way round: q, k and v as three matmuls on the slices of the qkv
        kernel (q's 1/sqrt(K) folded into its slice) and the two gates' logits as two matmuls on
        the halves of gate_up, so that no pass slices their outputs apart for BiGLA and the
        backward concatenates no gradients (same parameters; not with fused_proj).
      dwconv: "conv" (XLA grouped convolution) or "shift" (nine shifted multiply-adds).
      fp32_mix: the RMSNorms of o and xs, the sigmoid mix and the output SiLU as one float32 chain,
        rounded to `dtype` once before the output projection (the plain form rounds the two
        norms and the mix gate to `dtype` first; the same numbers in float32). Where BiGLA runs
        its Pallas kernel (a GPU, or bigla_interpret) the chain runs as Pallas kernels too
        (`pallas_kernels.norm_mix`, forward and backward).
      gates_in_kernel: hand BiGLA the gate logits (`bigla_logits`): the pallas kernels compute
        log_sigmoid(x) / 16 where they read a gate, so no float32 gate tensors are written and
        read back; other impls compute the gates in XLA exactly as the plain form does.
      compact_gates: with a bfloat16 compute dtype, hand BiGLA the log gates (computed in
        float32) rounded to bfloat16: the pallas kernels read them as stored and write their
        gradients in bfloat16, half the gate traffic of float32 (errors against a float64
        reference within 10% of float32 gates' at bf16 q, k, v: tests/test_bigla_pallas.py);
        other dtypes, and gates_in_kernel, are unchanged by it.
      mix_apart: the mix gate's matmul reads xs through an optimization barrier, so that XLA's
        dot merger does not run it and the qkv projection (which read the same xs) as one matmul:
        merged, their output is [B, N, 2 key_dim + 2 D] and an extra pass copies qkv out of it
        for BiGLA and another adds the mix gate's bias; apart, cuBLAS adds the bias in its
        epilogue. The same numbers (the barrier is an identity); not with fused_proj, which
        merges them on purpose.
      save_states: BiGLA's pallas kernels keep the forward's chunk states for the backward
        (`bigla(..., save_states=True)`, the default): less backward work, more activation
        memory; False recomputes them in the backward.
      bigla_chunk: BiGLA's chunk size (`bigla(..., chunk_size=)`); None: each implementation's
        default.
      packed_bigla: hand BiGLA the qkv projection's output and the gates whole
        (`bigla_packed`): its pallas kernels read q, k, v and both gates in place, and their
        backward writes the gradients whole, so no XLA pass slices them apart (forward) or
        concatenates their gradients (backward); the same numbers (not with split_proj, whose
        projections are separate arrays already).
      dtype: compute dtype; gates are computed in float32 (float64 when computing in float64).
    """

    num_heads: int
    use_act_in_conv: bool
    use_out_act: bool
    xavier_init: bool
    bigla_impl: str
    bigla_interpret: bool = False
    fused_proj: bool = False
    split_proj: bool = False
    dwconv: str = "conv"
    fp32_mix: bool = False
    gates_in_kernel: bool = False
    compact_gates: bool = False
    mix_apart: bool = False
    save_states: bool = True
    bigla_chunk: int | None = None
    packed_bigla: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, h, w, D] -> [B, h, w, D]."""
        B, h, w, D = x.shape
        H = self.num_heads
        if D % (2 * H):
            raise ValueError(f"width D={D} must be divisible by 2 * num_heads = {2 * H}")
        if self.fused_proj and self.split_proj:
            raise ValueError("fused_proj and split_proj are opposite forms: set at most one")
        N, key_dim = h * w, D // 2
        K, V = key_dim // H, D // H
        xavier = xavier_uniform(XAVIER_GAIN)
        proj_init = xavier if self.xavier_init else trunc_normal(0.02)
        acc = stats_dtype(self.dtype)

        def dense(features, name, use_bias=False):
            return nn.Dense(
                features, use_bias=use_bias, kernel_init=proj_init, dtype=self.dtype, name=name
            )

        xs = DepthwiseConv3x3(xavier, self.dwconv, self.dtype, name="dwconv")(x)
        if self.use_act_in_conv:
            xs = nn.silu(xs)
        xs = xs.reshape(B, N, D)  # row-major tokens

        if self.fused_proj:
            widths = (2 * key_dim + D, D, GATE_LOW_RANK)  # [q | k | v], mix_gate, gate_down
            w_qkv, _ = DenseParams(widths[0], False, proj_init, name="qkv")(D)
            w_mix, b_mix = DenseParams(widths[1], True, proj_init, name="mix_gate")(D)
            w_down, _ = DenseParams(widths[2], False, proj_init, name="gate_down")(D)
            # [B, N, 2 key_dim + 2 D + 16]: the rank-16 gate_down last keeps the others aligned.
            y = linear(xs, jnp.concatenate([w_qkv, w_mix, w_down], axis=1), self.dtype)
            qkv, mix_logits, down = jnp.split(y, np.cumsum(widths)[:-1], axis=-1)
            mix_logits = mix_logits + b_mix.astype(self.dtype)
        elif self.split_proj:
            w_qkv, _ = DenseParams(2 * key_dim + D, False, proj_init, name="qkv")(D)
            w_q, w_k, w_v = jnp.split(w_qkv, [key_dim, 2 * key_dim], axis=1)
            q, k, v = (linear(xs, w, self.dtype) for w in (w_q * K**-0.5, w_k, w_v))
            down = dense(GATE_LOW_RANK, "gate_down")(xs)  # [B, N, 16]
            mix_logits = None
        else:
            qkv = dense(2 * key_dim + D, "qkv")(xs)  # [B, N, 2 key_dim + D] = [q | k | v]
            down = dense(GATE_LOW_RANK, "gate_down")(xs)  # [B, N, 16]
            mix_logits = None  # computed after BiGLA, where the plain form has it
        packed = self.packed_bigla and not self.split_proj
        if not self.split_proj and not packed:
            q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
            q = q.reshape(B, N, H, K) * jnp.asarray(K**-0.5, self.dtype)
        if not packed:
            q, k, v = q.reshape(B, N, H, K), k.reshape(B, N, H, K), v.reshape(B, N, H, V)

        # The gate logits: both directions' [xf | xb] from one matmul, or each from its own.
        if self.split_proj:
            w_up, b_up = DenseParams(2 * key_dim, True, proj_init, name="gate_up")(GATE_LOW_RANK)
            gates = [
                linear(down, w, self.dtype) + b.astype(self.dtype)
                for w, b in zip(jnp.split(w_up, 2, axis=1), jnp.split(b_up, 2), strict=True)
            ]
        else:
            gates = [dense(2 * key_dim, "gate_up", use_bias=True)(down)]
        if not self.gates_in_kernel:
            # log_sigmoid of low-precision logits loses the small gates that matter most: float32.
            gates = [jax.nn.log_sigmoid(x.astype(acc)) / GATE_LOGIT_NORMALIZER for x in gates]
            if self.compact_gates and jnp.dtype(self.dtype) == jnp.bfloat16:
                gates = [x.astype(jnp.bfloat16) for x in gates]
        run = dict(
            impl=self.bigla_impl,
            interpret=self.bigla_interpret,
            save_states=self.save_states,
            chunk_size=self.bigla_chunk,
        )
        if packed:
            normalizer = GATE_LOGIT_NORMALIZER if self.gates_in_kernel else None
            o = bigla_packed(
                qkv, gates[0], num_heads=H, key_dim=key_dim, q_scale=K**-0.5,
                normalizer=normalizer, **run,
            )  # fmt: skip
        else:
            o = self._bigla(q, k, v, gates, run)
        o = checkpoint_name(o, BIGLA_OUTPUT)  # [B, N, H, V]; saved by remat "block"
        if mix_logits is None:
            mix_in = jax.lax.optimization_barrier(xs) if self.mix_apart else xs
            mix_logits = dense(D, "mix_gate", use_bias=True)(mix_in)
        if self.fp32_mix:
            o = norm_mix(
                o,
                xs,
                mix_logits,
                NormScale(V, name="o_norm")(),
                NormScale(V, name="local_norm")(),
                eps=NORM_EPS,
                out_act=self.use_out_act,
                impl="reference" if self.bigla_impl in ("reference", "chunked") else "auto",
                interpret=self.bigla_interpret,
            )
            return dense(D, "out")(o).reshape(B, h, w, D)
        # The plain form: each norm and the mix rounded to `dtype` (statistics in float32).
        o = RMSNorm(NORM_EPS, self.dtype, name="o_norm")(o)  # [B, N, H, V]
        local = RMSNorm(NORM_EPS, self.dtype, name="local_norm")(xs.reshape(B, N, H, V))
        mix = nn.sigmoid(mix_logits.reshape(B, N, H, V).astype(self.dtype))
        o = (o * mix + local * (1 - mix)).reshape(B, N, D)
        if self.use_out_act:
            o = nn.silu(o)
        return dense(D, "out")(o).reshape(B, h, w, D)

    def _bigla(self, q, k, v, gates, run):
        """BiGLA on separate q, k, v [B, N, H, d] and the gates as one [B, N, 2 key_dim] array
        (split here) or two."""
        B, N, H, K = q.shape
        if len(gates) == 1:
            gates = jnp.split(gates[0], 2, axis=-1)
        gf, gb = (x.reshape(B, N, H, K) for x in gates)  # log gates, or logits for the kernels
        if self.gates_in_kernel:
            return bigla_logits(q, k, v, gf, gb, normalizer=GATE_LOGIT_NORMALIZER, **run)
        return bigla(q, k, v, gf, gb, **run)
