"""Building blocks shared by ViG and ViG-H (docs/architecture.md): norms, SwiGLU MLP, DropPath, conv stems.

Everything is channels-last: tokens are [B, N, D] or grids [B, h, w, D]. Parameters are float32; the
computation runs in `dtype`, with norm statistics in float32 (float64 when computing in float64).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Initializer = Callable[..., jax.Array]


def xavier_uniform(gain: float) -> Initializer:
    """torch's `xavier_uniform_(w, gain)`: variance gain^2 * 2 / (fan_in + fan_out), uniform.

    Flax's fan computation (in axis -2, out axis -1, receptive field = the other axes) gives torch's
    fans for our layouts too: a depthwise kernel [3, 3, 1, C] has fan_in 9 and fan_out 9 C, as
    torch's [C, 1, 3, 3].
    """
    return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def trunc_normal(std: float) -> Initializer:
    """timm's `trunc_normal_(w, std)`: normal(0, std) cut at +-2 in absolute units (not +-2 std)."""
    return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def torch_conv_kernel_init() -> Initializer:
    """torch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)): uniform(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Initializer:
    """torch's default Conv2d bias init: uniform(+-1/sqrt(fan_in)), fan_in = C_in * kh * kw."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def stats_dtype(dtype) -> jnp.dtype:
    """float32, or float64 when computing in float64: dtype of norm statistics and BiGLA gates."""
    return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (fla's RMSNorm).

    Applied to [..., V] it is the per-head norm of the GLA layer (one weight of size V, all heads).
    """

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., F] -> [..., F] in `dtype`."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        acc = stats_dtype(self.dtype)
        x = x.astype(acc)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(acc)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last (channel) axis, eps 1e-5: torch's LayerNorm and official LayerNorm2d.

    The variance is the mean of squared deviations (not E[x^2] - E[x]^2) as in torch.
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., C] -> [..., C] in `dtype`."""
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
        acc = stats_dtype(self.dtype)
        x = x.astype(acc)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(acc) + bias.astype(acc)).astype(self.dtype)


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """Hidden width I of the SwiGLU MLP: int(dim * 4 * 2/3) rounded up to `multiple_of`."""
    hidden = int(dim * 4 * 2 / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """y = (SiLU(a) * b) @ W_down with [a | b] = x @ W_up; no biases (fla GLAMLP, ViG-H gMlp)."""

    hidden: int
    kernel_init: Initializer
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D]."""
        dense = lambda features, name: nn.Dense(
            features, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype, name=name
        )
        a, b = jnp.split(dense(2 * self.hidden, "up")(x), 2, axis=-1)  # [..., I] each
        return dense(x.shape[-1], "down")(nn.silu(a) * b)


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples with probability `rate`, scales others by 1/(1-rate).

    Uses the "dropout" rng stream; identity when not training or when rate is 0.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, ...] -> [B, ...]."""
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def conv_out_size(size: int, kernel: int, stride: int, padding: int = 1) -> int:
    """Output length of a torch-style convolution (floor division)."""
    return (size + 2 * padding - kernel) // stride + 1


class ConvNorm(nn.Module):
    """Conv(k, s, padding 1, bias) -> LayerNorm over channels: stem stages and the v3 downsample.

    Convolutions keep torch's default initialisation, as in the official models (no re-init
    touches them).
    """

    features: int
    kernel: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, h, w, features], h = floor((H + 2 - k) / s) + 1."""
        fan_in = x.shape[-1] * self.kernel**2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((1, 1), (1, 1)),
            kernel_init=torch_conv_kernel_init(),
            bias_init=torch_conv_bias_init(fan_in),
            dtype=self.dtype,
            name="conv",
        )(x)
        return LayerNorm(dtype=self.dtype, name="norm")(x)


class PatchEmbed(nn.Module):
    """Two-conv stem: ConvNorm(D/2, k, s) -> act -> ConvNorm(D, 3, 2).

    Plain ViG ("v2" patch embed, stride 16): k=9, s=8, act=SiLU.
    ViG-H stem (stride 4): k=3, s=2, act=GELU.
    """

    embed_dim: int
    first_kernel: int
    first_stride: int
    act: Callable[[jax.Array], jax.Array]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, 3] -> [B, h, w, D]."""
        x = ConvNorm(
            self.embed_dim // 2, self.first_kernel, self.first_stride, self.dtype, name="stage1"
        )(images)
        x = self.act(x)
        return ConvNorm(self.embed_dim, 3, 2, self.dtype, name="stage2")(x)
