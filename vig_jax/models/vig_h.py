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
from flax.core import FrozenDict

from vig_jax.models import stack
from vig_jax.models.gla import GatedLinearAttention, layer_forms
from vig_jax.models.layers import (
    ConvNorm,
    DropPath,
    LayerNorm,
    PatchEmbed,
    SwiGLU,
    check_images,
    mean_pool_head,
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
    dtype: jnp.dtype
    gla: FrozenDict = FrozenDict()  # GatedLinearAttention fields of gla.LAYER_FORMS
    mlp_split_up: bool = False

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
            dtype=self.dtype,
            name="attn",
            **self.gla,
        )(y)
        x = x + drop_path(y, train=train)
        y = LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
        hidden = swiglu_hidden(x.shape[-1], 32)
        y = SwiGLU(hidden, LINEAR_INIT, self.dtype, self.mlp_split_up, name="mlp")(y)
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
      fused_proj, dwconv, fp32_mix, gates_in_kernel, compact_gates, mix_apart: forms of the
        GLA layer (see `GatedLinearAttention`); the parameters are the same for all of them.
        compact_gates and mix_apart are on by default, as in plain ViG, whose GLA layer is the
        same (timed on plain ViG only).
      mlp_split_up: the MLP's up projection as two matmuls (`SwiGLU.split_up`), same parameters.
      split_proj: q, k, v and the two gates' logits as separate matmuls (see
        `GatedLinearAttention`), same parameters; not with fused_proj.
      save_states: BiGLA's pallas kernels keep the forward's chunk states for the backward
        (default; False recomputes them: less memory, slower; see `GatedLinearAttention`).
      bigla_chunk: BiGLA's chunk size; None: each implementation's default.
      packed_bigla: BiGLA reads q, k, v and the gates in place from the projections' outputs
        (`GatedLinearAttention.packed_bigla`; default): the same numbers without the XLA passes
        that slice them apart and concatenate their gradients.
      stem_impl: the stem's first, 3-channel convolution (`layers.CONV_IMPLS`): "conv",
        "patches" (patch extraction + one matmul) or "blocks" (2 x 2 pixel blocks as channels,
        then a 2 x 2 convolution); same parameters.
      remat: "none", "block" or "full" (see `stack`): activation memory against recomputation.
      scan_blocks: run each stage's blocks as one lax.scan (compiles one block per stage); same
        parameters; stochastic depth draws other masks than the unrolled loop.
      dtype: compute dtype; parameters stay float32.
    """

    num_classes: int
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    drop_path_rate: float
    bigla_impl: str = "auto"
    bigla_interpret: bool = False
    fused_proj: bool = False
    dwconv: str = "conv"
    fp32_mix: bool = False
    gates_in_kernel: bool = False
    compact_gates: bool = True
    mix_apart: bool = True
    mlp_split_up: bool = False
    split_proj: bool = False
    save_states: bool = True
    bigla_chunk: int | None = None
    packed_bigla: bool = True
    stem_impl: str = "conv"
    remat: str = "none"
    scan_blocks: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if not len(self.dims) == len(self.depths) == len(self.num_heads):
            raise ValueError(
                f"dims, depths and num_heads need one entry per stage: got {self.dims=}, "
                f"{self.depths=}, {self.num_heads=}"
            )
        self.stem = PatchEmbed(self.dims[0], 3, 2, gelu_exact, self.dtype, self.stem_impl)
        rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)))
        self.stages = [
            [
                ViGHBlock(
                    heads, float(next(rates)), self.dtype, layer_forms(self), self.mlp_split_up
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
        check_images(images)
        x = self.stem(images.astype(self.dtype))  # [B, h_1, w_1, C_1]
        scan = self.scan_blocks and not self.is_initializing()  # init creates the parameters
        outs = []
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            if scan and len(blocks) > 1:
                x = stack.scan_blocks(self, blocks, x, train=train, remat=self.remat)
            else:
                for block in blocks:
                    x = stack.apply_block(block, x, train=train, remat=self.remat)
            outs.append(x)
        return outs

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images: [B, H, W, 3] NHWC -> logits [B, num_classes], float32 (float64 under float64)."""
        x = self.head_norm(self.features(images, train=train)[-1])
        return mean_pool_head(self.head, x, self.dtype)


VARIANTS = {
    "vig_h_t": (ViGH, dict(dims=(96, 192, 384, 768), depths=(2, 2, 5, 2),
                           num_heads=(3, 6, 12, 24), drop_path_rate=0.2)),
    "vig_h_s": (ViGH, dict(dims=(96, 192, 384, 768), depths=(2, 2, 17, 2),
                           num_heads=(3, 6, 12, 24), drop_path_rate=0.3)),
    "vig_h_b": (ViGH, dict(dims=(128, 256, 512, 1024), depths=(2, 2, 17, 2),
                           num_heads=(4, 8, 16, 32), drop_path_rate=0.6)),
}  # fmt: skip
