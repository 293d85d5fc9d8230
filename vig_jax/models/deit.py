"""DeiT-T/S/B (ViT with a class token): the softmax-attention baseline.

Architecture as in DeiT / timm `VisionTransformer`: 16x16 patch conv, class token, learned
position embedding for 224² (1 + 14·14 rows), 12 pre-norm blocks (LayerNorm eps 1e-6, qkv with
bias, MLP ratio 4 with exact GELU), final LayerNorm, linear head on the class token. At another
resolution the 14x14 part of the position table is resized bicubically at run time (the class-token
row is kept as is).

This model is a speed, memory and FLOPs baseline: it has no dropout or stochastic depth, so `train`
does not change its output (it is there for the common `__call__(images, *, train)` interface).

Attention goes through `jax.nn.dot_product_attention`. `attention_impl=None` lets XLA choose (plain
softmax attention with an [N, N] score matrix); "cudnn" asks for cuDNN flash attention (bf16/fp16 on
a GPU only). cuDNN's backward rejects some sequence lengths (N = 197, 1025, 4097 fail on an H100
with "Unsupported sequence length"), so `token_multiple` pads q, k and v with zeros up to a
multiple of it inside each attention call, masks the padded keys (`key_value_seq_lengths`) and
drops the padded output rows. Only the attention kernel sees the padding (the MLPs and projections
run on the real tokens), and the logits equal the unpadded model's.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vig_jax.models import stack
from vig_jax.models.layers import (
    check_images,
    torch_conv_bias_init,
    torch_conv_kernel_init,
    trunc_normal,
)
from vig_jax.models.pos_embed import resize_pos_embed

ATTENTION_IMPLS = (None, "xla", "cudnn")

# timm's ViT init: trunc_normal(0.02) (cut at +-2 absolute, not +-2 std) for Linear weights and
# the position table, zero Linear biases; the patch conv keeps PyTorch's default weight and bias.
_dense_init = trunc_normal(0.02)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias) and an output projection.

    Attributes:
        num_heads: H; the head dim is K = D / H.
        attention_impl: None (XLA chooses), "xla" or "cudnn" (`jax.nn.dot_product_attention`).
        token_multiple: pad the sequence given to the attention kernel to a multiple of this.
        dtype: compute dtype (params stay float32).
    """

    num_heads: int
    attention_impl: str | None
    token_multiple: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        # Channel layout [q | k | v], each head-major, as timm's qkv Linear.
        qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_dense_init, name="qkv")(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)  # [B, T, 3, H, K]
        t_pad = self.token_multiple * math.ceil(t / self.token_multiple)
        kv_lengths = None
        if t_pad > t:
            qkv = jnp.pad(qkv, ((0, 0), (0, t_pad - t), (0, 0), (0, 0), (0, 0)))  # [B, Tp, 3, H, K]
            kv_lengths = jnp.full((b,), t, jnp.int32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, Tp, H, K]
        o = jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=kv_lengths, implementation=self.attention_impl
        )  # [B, Tp, H, K]
        o = o[:, :t].reshape(b, t, d)  # [B, T, D]
        return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="proj")(o)


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> exact GELU -> fc2 (hidden -> D), both with bias."""

    hidden_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D]."""
        d = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=_dense_init, name="fc1")(x)
        x = nn.gelu(x, approximate=False)  # timm's nn.GELU is the erf form
        return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(x)


class DeiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); LayerNorm eps 1e-6."""

    num_heads: int
    mlp_ratio: float
    attention_impl: str | None
    token_multiple: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D]."""
        d = x.shape[-1]
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        attn = Attention(
            self.num_heads, self.attention_impl, self.token_multiple, self.dtype, name="attn"
        )
        x = x + attn(y)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        return x + Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(y)


class DeiT(nn.Module):
    """DeiT / ViT classifier with a class token; images NHWC in, logits out.

    Attributes:
        num_classes: head outputs.
        embed_dim: D.
        depth: number of blocks.
        num_heads: H.
        mlp_ratio: MLP hidden width / D.
        patch_size: P; the token grid of an [B, Hi, Wi, 3] image is h = Hi // P, w = Wi // P.
        pos_embed_grid: grid (h0, w0) the position table is learned for (14x14 for 224² at P = 16).
        attention_impl: None (XLA chooses), "xla" or "cudnn" (flash; GPU, bf16/fp16 only).
        token_multiple: inside attention, pad the token count 1 + h·w up to a multiple of this
            (1 = no padding), masking the padded keys; e.g. 64 for cuDNN's backward.
        remat: "none", "block" or "full" (`vig_jax.models.stack`), as for ViG.
        dtype: compute dtype; params are float32.
    """

    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pos_embed_grid: tuple[int, int] = (14, 14)
    attention_impl: str | None = None
    token_multiple: int = 1
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool):
        """images: [B, Hi, Wi, 3], Hi and Wi >= patch_size -> logits [B, num_classes] float32.

        Raises:
            ValueError: on a bad attention_impl, token_multiple, head count or image shape.
        """
        del train  # no dropout or stochastic depth in this baseline (see the module docstring)
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"{self.attention_impl=} must be one of {ATTENTION_IMPLS}")
        if self.token_multiple < 1:
            raise ValueError(f"{self.token_multiple=} must be >= 1")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.embed_dim=} must be divisible by {self.num_heads=}")
        check_images(images)
        p, d = self.patch_size, self.embed_dim
        if images.shape[1] < p or images.shape[2] < p:
            raise ValueError(f"images {images.shape[1:3]} are smaller than one {p}x{p} patch")

        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=torch_conv_kernel_init(),
            bias_init=torch_conv_bias_init(p * p * images.shape[-1]),
            name="patch_embed",
        )(images)  # [B, h, w, D]
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, d)  # [B, N, D]

        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
        h0, w0 = self.pos_embed_grid
        pos_embed = self.param("pos_embed", trunc_normal(0.02), (1, 1 + h0 * w0, d))
        # torch-compatible bicubic resize (identity at 14x14); timm also sets antialias=True, which
        # only differs when shrinking below the learned grid (images under 224²).
        grid_pos = resize_pos_embed(pos_embed[0, 1:].reshape(h0, w0, d), (h, w))  # [h, w, D]
        pos = jnp.concatenate(
            [pos_embed[:, :1], grid_pos.reshape(1, h * w, d)], axis=1
        )  # [1, 1+N, D]
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)), x.astype(jnp.float32)], axis=1)
        x = (x + pos).astype(self.dtype)  # [B, 1+N, D]

        for i in range(self.depth):
            block = DeiTBlock(
                self.num_heads,
                self.mlp_ratio,
                self.attention_impl,
                self.token_multiple,
                self.dtype,
                name=f"block{i}",
            )
            x = stack.apply_block(block, x, train=None, remat=self.remat)  # [B, 1+N, D]

        # LayerNorm acts per token: normalising only the class token equals timm's norm-then-pick.
        cls = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x[:, 0])  # [B, D]
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_dense_init, name="head")(
            cls
        )
        return logits.astype(jnp.float32)  # [B, num_classes]


VARIANTS = {
    "deit_t": (DeiT, dict(embed_dim=192, depth=12, num_heads=3)),
    "deit_s": (DeiT, dict(embed_dim=384, depth=12, num_heads=6)),
    "deit_b": (DeiT, dict(embed_dim=768, depth=12, num_heads=12)),
}
