"""Plain (isotropic) ViG-T/S/B (docs/architecture.md; official classification/models/vig.py).

Patch embed v2 (stride 16) -> + absolute position embedding (learned on the 14x14 grid of 224^2
images, bicubically resized for other grids) -> depth x ViGBlock -> RMSNorm -> mean over tokens ->
Linear head.
The token grid is kept as [B, h, w, D] throughout (N = h*w, row-major).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import FrozenDict

from vig_jax.models import stack
from vig_jax.models.gla import GatedLinearAttention, layer_forms
from vig_jax.models.layers import (
    DropPath,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    check_images,
    mean_pool_head,
    swiglu_hidden,
    trunc_normal,
)
from vig_jax.models.pos_embed import resize_pos_embed

NORM_EPS = 1e-6
POS_GRID = 14  # the position table is learned for 224 / 16 = 14 tokens per side
LINEAR_INIT = nn.initializers.normal(0.02)  # fla's _init_weights: normal, not truncated


class ViGBlock(nn.Module):
    """Pre-norm block: x += DropPath(GLA(RMSNorm(x))); x += DropPath(SwiGLU(RMSNorm(x)))."""

    num_heads: int
    use_act_in_conv: bool
    use_out_act: bool
    drop_path: float
    dtype: jnp.dtype
    gla: FrozenDict = FrozenDict()  # GatedLinearAttention fields of gla.LAYER_FORMS
    mlp_split_up: bool = True
    mlp_mosaic_up: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, h, w, D] -> [B, h, w, D]."""
        drop_path = DropPath(self.drop_path)
        y = RMSNorm(NORM_EPS, self.dtype, name="attn_norm")(x)
        y = GatedLinearAttention(
            self.num_heads,
            self.use_act_in_conv,
            self.use_out_act,
            xavier_init=True,
            dtype=self.dtype,
            name="attn",
            **self.gla,
        )(y)
        x = x + drop_path(y, train=train)
        y = RMSNorm(NORM_EPS, self.dtype, name="mlp_norm")(x)
        hidden = swiglu_hidden(x.shape[-1], 256)
        mlp = SwiGLU(
            hidden, LINEAR_INIT, self.dtype, self.mlp_split_up, self.mlp_mosaic_up, name="mlp"
        )
        y = mlp(y, inference=not train)
        return x + drop_path(y, train=train)


class ViG(nn.Module):
    """Plain ViG classifier.

    Attributes:
      num_classes: width of the head.
      embed_dim: D; divisible by 2 * num_heads.
      depth: number of blocks.
      num_heads: H (K = D / 2H, V = D / H).
      use_act_in_conv, use_out_act: the ViG-T SiLUs of the GLA layer.
      drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
      bigla_impl: "auto", "reference", "chunked" or "pallas" (see `pallas_kernels.bigla.bigla`).
      bigla_interpret: run the pallas kernel in interpret mode (CPU tests).
      pos_grid: side of the learned position table (14: the official 224^2 grid); other token
        grids use its bicubic resize. A fine-tune at another resolution may learn a table of its
        own grid, resized once from the pretrained one (`vig_jax.train.init_from`).
      fused_proj, dwconv, fp32_mix, gates_in_kernel, compact_gates, mix_apart: forms of the
        GLA layer (see `GatedLinearAttention`); the parameters are the same for all of them.
        fp32_mix is on by default here: on an H200 it inferred 3-4% and trained 0-3% faster than
        the plain bf16 chain (ViG-S 224², ViG-T 1024²; same call). compact_gates is on by default
        (bf16 gates: ViG-S 224² inference 2%, training 1% faster, 3% less training memory; H200,
        same call), and so is mix_apart.
      mlp_split_up: the MLP's up projection as two matmuls (`SwiGLU.split_up`), same parameters;
        on by default here (training 2% faster at ViG-S 224², 7% at ViG-T 1024² on an H200).
      mlp_mosaic_up: experimental, off: in the forward pass without training (bf16, on a GPU),
        the MLP's up projection and SiLU gate as one Mosaic GPU kernel (`SwiGLU.mosaic_up`),
        same parameters; not yet run on a GPU.
      split_proj: q, k, v and the two gates' logits as separate matmuls (see
        `GatedLinearAttention`), same parameters; not with fused_proj.
      save_states: BiGLA's pallas kernels keep the forward's chunk states for the backward
        (default; False recomputes them: less memory, slower; see `GatedLinearAttention`).
      bigla_chunk: BiGLA's chunk size; None: each implementation's default.
      packed_bigla: BiGLA reads q, k, v and the gates in place from the projections' outputs
        (`GatedLinearAttention.packed_bigla`; default): the same numbers without the XLA passes
        that slice them apart and concatenate their gradients.
      stem_impl: the stem's first, 3-channel convolution (`layers.CONV_IMPLS`): "blocks" (8 x 8
        pixel blocks as channels, then a 2 x 2 convolution; the default: ViG-S 224² inference
        3.5% faster than "patches" on an H200), "patches" (patch extraction + one matmul; 2-3%
        faster inference than "conv") or "conv"; same parameters.
      remat: "none", "block" or "full" (see `stack`): activation memory against recomputation.
      scan_blocks: run the blocks as one lax.scan (compiles one block instead of `depth`); same
        parameters; stochastic depth draws other masks than the unrolled loop.
      embed_barrier: the stem's output plus the position embedding passes an optimization
        barrier, so XLA writes it once instead of recomputing the stem's LayerNorm inside both
        of block 0's norm fusions (the default: ViG-S 224² inference 1.4% faster on an H200,
        one call); same numbers.
      dtype: compute dtype; parameters stay float32.
    """

    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    use_act_in_conv: bool
    use_out_act: bool
    drop_path_rate: float
    pos_grid: int = POS_GRID
    bigla_impl: str = "auto"
    bigla_interpret: bool = False
    fused_proj: bool = False
    dwconv: str = "conv"
    fp32_mix: bool = True
    gates_in_kernel: bool = False
    compact_gates: bool = True
    mix_apart: bool = True
    mlp_split_up: bool = True
    mlp_mosaic_up: bool = False
    split_proj: bool = False
    save_states: bool = True
    bigla_chunk: int | None = None
    packed_bigla: bool = True
    stem_impl: str = "blocks"
    remat: str = "none"
    scan_blocks: bool = False
    embed_barrier: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        D = self.embed_dim
        if D % 2 or D % (2 * self.num_heads):
            raise ValueError(
                f"embed_dim={D} must be divisible by 2 * num_heads={2 * self.num_heads}"
            )
        self.stem = PatchEmbed(D, 9, 8, nn.silu, self.dtype, self.stem_impl)
        self.pos_embed = self.param(
            "pos_embed", trunc_normal(0.02), (1, self.pos_grid * self.pos_grid, D), jnp.float32
        )
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        self.blocks = [
            ViGBlock(
                self.num_heads,
                self.use_act_in_conv,
                self.use_out_act,
                float(rate),
                self.dtype,
                layer_forms(self),
                self.mlp_split_up,
                self.mlp_mosaic_up,
            )
            for rate in rates
        ]
        self.norm = RMSNorm(NORM_EPS, self.dtype)
        self.head = nn.Dense(self.num_classes, kernel_init=LINEAR_INIT, dtype=self.dtype)

    def features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Normalised tokens as a 2D map.

        Args:
          images: [B, H, W, 3] NHWC, any float dtype (ImageNet-normalised).
          train: enables stochastic depth (needs a "dropout" rng).

        Returns:
          [B, h, w, D] in `dtype`, h = floor((floor((H - 7) / 8) + 1 - 1) / 2) + 1 (same for w).

        Sows "patch_embed" (tokens before the position embedding) and "block0" (after the first
        block), both [B, N, D], into the "intermediates" collection.
        """
        check_images(images)
        x = self.stem(images.astype(self.dtype))  # [B, h, w, D]
        B, h, w, D = x.shape
        self.sow("intermediates", "patch_embed", x.reshape(B, h * w, D))
        pos = resize_pos_embed(self.pos_embed.reshape(self.pos_grid, self.pos_grid, D), (h, w))
        x = x + pos.astype(self.dtype)
        if self.embed_barrier:  # written once, not recomputed in block 0's norm fusions
            x = jax.lax.optimization_barrier(x)
        # Unrolled: at init (creates the parameters), without scan_blocks, and for block 0 when
        # intermediates are collected (its output is sown); the rest as one scan.
        unrolled = self.depth
        if self.scan_blocks and not self.is_initializing():
            unrolled = 1 if self.is_mutable_collection("intermediates") else 0
        for i, block in enumerate(self.blocks[:unrolled]):
            x = stack.apply_block(block, x, train=train, remat=self.remat)
            if i == 0:
                self.sow("intermediates", "block0", x.reshape(B, h * w, D))
        if self.blocks[unrolled:]:
            x = stack.scan_blocks(self, self.blocks[unrolled:], x, train=train, remat=self.remat)
        return self.norm(x)

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images: [B, H, W, 3] NHWC -> logits [B, num_classes], float32 (float64 under float64)."""
        return mean_pool_head(self.head, self.features(images, train=train), self.dtype)


VARIANTS = {
    "vig_t": (ViG, dict(embed_dim=192, depth=12, num_heads=3, use_act_in_conv=True,
                        use_out_act=True, drop_path_rate=0.0)),
    "vig_s": (ViG, dict(embed_dim=384, depth=12, num_heads=6, use_act_in_conv=False,
                        use_out_act=False, drop_path_rate=0.2)),
    "vig_b": (ViG, dict(embed_dim=768, depth=12, num_heads=12, use_act_in_conv=False,
                        use_out_act=False, drop_path_rate=0.5)),
}  # fmt: skip
