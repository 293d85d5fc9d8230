"""Hierarchical ViG-H-T/S/B (docs/architecture.md; official models/vig_h.py).

Stem (stride 4) -> 4 stages of ViGHBlocks with a v3 downsample (Conv k3 s2 + LayerNorm) between
them -> LayerNorm -> global average -> Linear head. The official model is channels-first with
LayerNorm2d; here everything is channels-last [B, h, w, C], which is the same math.

BiGLA returns the mean of the two directions: the official training path. The official eval path of
ViG-H sums them instead; the RMSNorm right after BiGLA cancels that factor 2 up to its eps, so both
paths give the same logits (docs/architecture.md, "ViG-H's two official paths").
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vig_jax.models.gla import GatedLinearAttention
from vig_jax.models.layers import (
    ConvNorm,
    DropPath,
    LayerNorm,
    PatchEmbed,
    SwiGLU,
    stats_dtype,
    swiglu_hidden,
    trunc_normal,
)

LINEAR_INIT = trunc_normal(0.02)  # HierViG._init_weights re-initialises every Linear with this


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch's nn.GELU(): the erf form, not the tanh approximation flax uses by default."""
    return nn.gelu(x, approximate=False)


class ViGHBlock(nn.Module):
    """x += DropPath(GLA(LN(x))); x += DropPath(SwiGLU(LN(x))), on the stage grid."""

    num_heads: int
    drop_path: float
    bigla_impl: str
    bigla_interpret: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, h, w, C] -> [B, h, w, C]."""
        drop_path = DropPath(self.drop_path)
        y = LayerNorm(dtype=self.dtype, name="attn_norm")(x)
        y = GatedLinearAttention(
            self.num_heads,
            use_act_in_conv=False,
            use_out_act=False,
            xavier_init=False,
            bigla_impl=self.bigla_impl,
            bigla_interpret=self.bigla_interpret,
            dtype=self.dtype,
            name="attn",
        )(y)
        x = x + drop_path(y, train=train)
        y = LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
        y = SwiGLU(swiglu_hidden(x.shape[-1], 32), LINEAR_INIT, self.dtype, name="mlp")(y)
        return x + drop_path(y, train=train)


class ViGH(nn.Module):
    """Hierarchical ViG classifier.

    Attributes:
      num_classes: width of the head.
      dims: channels C_i of the four stages; C_i divisible by 2 * num_heads[i].
      depths: blocks per stage.
      num_heads: heads per stage.
      drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks).
      bigla_impl: "auto", "reference", "chunked" or "pallas" (see `pallas_kernels.bigla.bigla`).
      bigla_interpret: run the pallas kernel in interpret mode (CPU tests).
      dtype: compute dtype; parameters stay float32.
    """

    num_classes: int
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    drop_path_rate: float
    bigla_impl: str = "auto"
    bigla_interpret: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if not len(self.dims) == len(self.depths) == len(self.num_heads):
            raise ValueError(
                f"dims, depths and num_heads need one entry per stage: got {self.dims=}, "
                f"{self.depths=}, {self.num_heads=}"
            )
        self.stem = PatchEmbed(self.dims[0], 3, 2, gelu_exact, self.dtype)
        rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)))
        self.stages = [
            [
                ViGHBlock(
                    heads, float(next(rates)), self.bigla_impl, self.bigla_interpret, self.dtype
                )
                for _ in range(depth)
            ]
            for depth, heads in zip(self.depths, self.num_heads, strict=True)
        ]
        self.downsamples = [ConvNorm(dim, 3, 2, self.dtype) for dim in self.dims[1:]]
        self.head_norm = LayerNorm(dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, kernel_init=LINEAR_INIT, dtype=self.dtype)

    def features(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """Outputs of the four stages (after their blocks, before the downsample).

        Args:
          images: [B, H, W, 3] NHWC, any float dtype (ImageNet-normalised).
          train: enables stochastic depth (needs a "dropout" rng).

        Returns:
          [[B, h_i, w_i, C_i] for each stage] in `dtype`; h_1 = ceil(ceil(H / 2) / 2), then halved
          (rounding up) by each downsample.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (NHWC), got {images.shape=}")
        x = self.stem(images.astype(self.dtype))  # [B, h_1, w_1, C_1]
        outs = []
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            for block in blocks:
                x = block(x, train=train)
            outs.append(x)
        return outs

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images: [B, H, W, 3] NHWC -> logits [B, num_classes], float32 (float64 under float64)."""
        x = self.head_norm(self.features(images, train=train)[-1])
        pooled = jnp.mean(x.astype(stats_dtype(self.dtype)), axis=(1, 2))  # [B, C_4]
        return self.head(pooled.astype(self.dtype)).astype(stats_dtype(self.dtype))


VARIANTS = {
    "vig_h_t": (ViGH, dict(dims=(96, 192, 384, 768), depths=(2, 2, 5, 2),
                           num_heads=(3, 6, 12, 24), drop_path_rate=0.2)),
    "vig_h_s": (ViGH, dict(dims=(96, 192, 384, 768), depths=(2, 2, 17, 2),
                           num_heads=(3, 6, 12, 24), drop_path_rate=0.3)),
    "vig_h_b": (ViGH, dict(dims=(128, 256, 512, 1024), depths=(2, 2, 17, 2),
                           num_heads=(4, 8, 16, 32), drop_path_rate=0.6)),
}  # fmt: skip
