"""Building blocks shared by ViG and ViG-H (docs/architecture.md): norms, SwiGLU MLP, DropPath,
conv stems, the depthwise conv, the image check and pooled head shared by the model families.

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


def check_images(images: jax.Array) -> None:
    """Raises ValueError unless `images` is [B, H, W, 3] (NHWC); every model starts with it."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (NHWC), got {images.shape=}")


def mean_pool_head(head: nn.Module, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Global average of a feature map in float32 (float64 under float64), then the linear head.

    Args:
      head: the classifier Dense, computing in `dtype`.
      x: [B, h, w, C] in `dtype`.

    Returns:
      logits [B, num_classes] in float32 (float64 when computing in float64).
    """
    pooled = jnp.mean(x.astype(stats_dtype(dtype)), axis=(1, 2))  # [B, C]
    return head(pooled.astype(dtype)).astype(stats_dtype(dtype))


class DenseParams(nn.Module):
    """The parameters nn.Dense(features) creates (same names, shapes, init), without applying them.

    Lets a layer multiply one input by several projections' kernels concatenated (one larger
    matmul) while the parameter tree, the converter and the checkpoints stay those of separate
    nn.Dense layers.
    """

    features: int
    use_bias: bool
    kernel_init: Initializer

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        """Returns (kernel [in_features, features], bias [features] or None), float32."""
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


def linear(x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x @ kernel computed as nn.Dense does it: both cast to `dtype`, default precision.

    x: [..., F_in], kernel: [F_in, F_out] -> [..., F_out] in `dtype`.
    """
    return jax.lax.dot_general(
        x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ()))
    )


DWCONV_IMPLS = ("conv", "shift")


def depthwise_conv3x3_shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 depthwise convolution, stride 1, zero padding 1, as nine shifted multiply-adds.

    The same function as `nn.Conv(D, (3, 3), padding=1, feature_group_count=D)`; written as
    elementwise work, which XLA fuses into one pass (forward) and one pass plus nine sibling
    reductions (backward), instead of a grouped convolution, whose backward is often slow on GPUs.
    Products are summed in float32 (float64 under float64) and rounded to x.dtype once.

    Args:
      x: [B, h, w, D] in the compute dtype.
      kernel: [3, 3, 1, D] (nn.Conv's depthwise layout), float32; cast to x.dtype first, as
        nn.Conv does.

    Returns:
      [B, h, w, D] in x.dtype.
    """
    _, h, w, _ = x.shape
    acc = stats_dtype(x.dtype)
    k = kernel.astype(x.dtype).astype(acc)  # [3, 3, 1, D]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(acc)  # [B, h+2, w+2, D]
    out = sum(xp[:, i : i + h, j : j + w] * k[i, j, 0] for i in range(3) for j in range(3))
    return out.astype(x.dtype)  # [B, h, w, D]


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv without bias (stride 1, padding 1); parameters those of the nn.Conv form.

    Attributes:
      kernel_init: initialiser of the [3, 3, 1, D] kernel.
      impl: "conv" (XLA grouped convolution) or "shift" (`depthwise_conv3x3_shift`).
      dtype: compute dtype.
    """

    kernel_init: Initializer
    impl: str = "conv"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, h, w, D] -> [B, h, w, D] in `dtype`."""
        if self.impl not in DWCONV_IMPLS:
            raise ValueError(f"dwconv impl {self.impl!r} must be one of {DWCONV_IMPLS}")
        D = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, D), jnp.float32)
        x = x.astype(self.dtype)
        if self.impl == "shift":
            return depthwise_conv3x3_shift(x, kernel)
        return jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=D,
        )


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


class NormScale(nn.Module):
    """The parameter an RMSNorm(features) creates ("scale", ones), for code that applies it itself
    (`pallas_kernels.norm_mix`): the parameter tree stays that of the RMSNorm."""

    features: int

    @nn.compact
    def __call__(self) -> jax.Array:
        """Returns scale [features], float32."""
        return self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)


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


def _mosaic_up_applies(D: int, hidden: int, dtype) -> bool:
    """Whether `SwiGLU.mosaic_up` runs its kernel: bf16 inputs on a GPU, widths it takes."""
    if dtype != jnp.bfloat16 or jax.default_backend() != "gpu":
        return False
    from pallas_kernels import swiglu_mosaic

    return swiglu_mosaic.supports(D, hidden)


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """Hidden width I of the SwiGLU MLP: int(dim * 4 * 2/3) rounded up to `multiple_of`."""
    hidden = int(dim * 4 * 2 / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """y = (SiLU(a) * b) @ W_down with [a | b] = x @ W_up; no biases (fla GLAMLP, ViG-H gMlp).

    `split_up`: a = x @ W_up[:, :I] and b = x @ W_up[:, I:] as two matmuls (same parameters).
    The plain form's one matmul makes the backward concatenate da and db into d[a | b] before the
    two matmuls that read it; XLA on GPU writes that [..., 2I] array as separate passes (twice
    over, at ViG-S 224² on an H200: 24 concatenations of 103 MB per training step).

    `mosaic_up` (experimental): with `inference=True`, bf16, on a GPU and at widths the kernel
    takes, SiLU(a) * b comes from `pallas_kernels.swiglu_mosaic.swiglu_up` (one Mosaic GPU kernel
    writing only the product; same parameters); otherwise the XLA forms above.
    """

    hidden: int
    kernel_init: Initializer
    dtype: jnp.dtype = jnp.float32
    split_up: bool = False
    mosaic_up: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, inference: bool = False) -> jax.Array:
        """x: [..., D] -> [..., D]."""
        dense = lambda features, name: nn.Dense(
            features, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype, name=name
        )
        if self.mosaic_up and inference and _mosaic_up_applies(x.shape[-1], self.hidden, x.dtype):
            from pallas_kernels import swiglu_mosaic

            w_up, _ = DenseParams(2 * self.hidden, False, self.kernel_init, name="up")(x.shape[-1])
            with jax.named_scope("up"):
                h = swiglu_mosaic.swiglu_up(x, w_up)
            return dense(x.shape[-1], "down")(h)
        if self.split_up:
            w_up, _ = DenseParams(2 * self.hidden, False, self.kernel_init, name="up")(x.shape[-1])
            with jax.named_scope("up"):  # the matmuls' place in profiles, as the plain form's
                a = linear(x, w_up[:, : self.hidden], self.dtype)  # [..., I]
                b = linear(x, w_up[:, self.hidden :], self.dtype)
        else:
            a, b = jnp.split(dense(2 * self.hidden, "up")(x), 2, axis=-1)  # [..., I] each
        return dense(x.shape[-1], "down")(nn.silu(a) * b)


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples with probability `rate`, scales others by 1/(1-rate).

    Uses the "dropout" rng stream; identity when not training or when rate is 0. The rate may be
    a traced scalar (blocks run as a scan, `stack.scan_blocks`).
    """

    rate: float | jax.Array

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, ...] -> [B, ...]."""
        if not train or (isinstance(self.rate, float) and self.rate == 0.0):
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
        )
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


CONV_IMPLS = ("conv", "patches", "blocks")


def conv_patches(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """k x k convolution, stride s, zero padding 1, as patch extraction plus one matmul.

    The patches are k^2 strided slices of the padded input concatenated along channels
    ([B, h, w, k^2 C_in], XLA fuses them into one pass), multiplied by the kernel reshaped to
    [k^2 C_in, F]. For few input channels (the 3-channel stem) this is a large matmul where a
    convolution kernel would run nearly idle; the kernel gradient is one matmul as well.

    Args:
      x: [B, H, W, C_in] in the compute dtype.
      kernel: [k, k, C_in, F] (HWIO, nn.Conv's layout) in the compute dtype.
      stride: s.

    Returns:
      [B, h, w, F], h = floor((H + 2 - k) / s) + 1 (same for w), in x.dtype.
    """
    k, _, c_in, features = kernel.shape
    _, H, W, _ = x.shape
    h, w = (H + 2 - k) // stride + 1, (W + 2 - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [
            xp[:, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride]
            for i in range(k)
            for j in range(k)
        ],
        axis=-1,
    )  # [B, h, w, k^2 C_in], channel = (i k + j) C_in + c: the row-major order of HWIO
    return linear(patches, kernel.reshape(k * k * c_in, features), x.dtype)


def conv_blocks(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """k x k convolution, stride s, zero padding 1, as a space-to-depth reshape plus an A x A
    convolution over s x s pixel blocks (A = ceil(k / s)).

    The padded input is cut into s x s blocks, each block's pixels laid out as channels
    ([B, h + A - 1, w + A - 1, s^2 C_in]: one transpose of the image, contiguous in memory); the
    k x k kernel, zero-padded to (A s) x (A s) taps, becomes an A x A kernel over the blocks. Output
    (i, j) reads padded rows s i + u for taps u < k, i.e. blocks i .. i + A - 1, so a stride-1 VALID
    A x A convolution over the blocks is the same sum (extra taps multiply zeros). For the ViG stem
    (k 9, s 8: A 2) this replaces the 81 three-channel slices of `conv_patches` with one reshape
    (on an H200, forward 0.094 against 0.189 ms at 224², batch 128, and 0.085 against 0.210 ms
    at 2048², batch 2; the A x A step as a concatenation of A^2 block views and one matmul took
    0.136 and 0.160 ms).

    Args:
      x: [B, H, W, C_in] in the compute dtype.
      kernel: [k, k, C_in, F] (HWIO) in the compute dtype.
      stride: s.

    Returns:
      [B, h, w, F], h = floor((H + 2 - k) / s) + 1 (same for w), in x.dtype.
    """
    k, _, c_in, features = kernel.shape
    s, A = stride, -(-k // stride)
    B, H, W, _ = x.shape
    h, w = (H + 2 - k) // s + 1, (W + 2 - k) // s + 1
    rows, cols = s * (h + A - 1), s * (w + A - 1)  # padded pixels the blocks cover
    # Padding 1 on top and left; zeros (or a crop of pixels no tap reads) at the bottom and right.
    xp = jnp.pad(x, ((0, 0), (1, max(0, rows - H - 1)), (1, max(0, cols - W - 1)), (0, 0)))
    xp = xp[:, :rows, :cols]
    blocks = xp.reshape(B, h + A - 1, s, w + A - 1, s, c_in).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(B, h + A - 1, w + A - 1, s * s * c_in)  # channel = (r s + t) C_in + c
    kp = jnp.pad(kernel, ((0, A * s - k), (0, A * s - k), (0, 0), (0, 0)))
    kb = kp.reshape(A, s, A, s, c_in, features).transpose(0, 2, 1, 3, 4, 5)
    kb = kb.reshape(A, A, s * s * c_in, features)  # [a, b, (r, t, c), F]: tap (a s + r, b s + t)
    return jax.lax.conv_general_dilated(
        blocks,
        kb,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class ConvNorm(nn.Module):
    """Conv(k, s, padding 1, bias) -> LayerNorm over channels: stem stages and the v3 downsample.

    Convolutions keep torch's default initialisation, as in the official models (no re-init
    touches them). `impl` "patches" computes the convolution as `conv_patches`, "blocks" as
    `conv_blocks` (a convolution over s x s pixel blocks), with the same parameters.
    """

    features: int
    kernel: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    impl: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, h, w, features], h = floor((H + 2 - k) / s) + 1."""
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"stem impl {self.impl!r} must be one of {CONV_IMPLS}")
        k = self.kernel
        inits = (torch_conv_kernel_init(), torch_conv_bias_init(x.shape[-1] * k**2))
        if self.impl != "conv":
            kernel, bias = ConvParams(self.features, (k, k), *inits, name="conv")(x.shape[-1])
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            conv = conv_patches if self.impl == "patches" else conv_blocks
            x = conv(x, kernel, self.stride)
            x = x + bias.astype(self.dtype)
        else:
            x = nn.Conv(
                self.features,
                (k, k),
                strides=(self.stride, self.stride),
                padding=((1, 1), (1, 1)),
                kernel_init=inits[0],
                bias_init=inits[1],
                dtype=self.dtype,
                name="conv",
            )(x)
        return LayerNorm(dtype=self.dtype, name="norm")(x)


class ConvParams(nn.Module):
    """The parameters nn.Conv creates (kernel [kh, kw, C_in, F], bias [F]), not applied."""

    features: int
    kernel_size: tuple[int, int]
    kernel_init: Initializer
    bias_init: Initializer

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """Returns (kernel [kh, kw, in_features, F], bias [F]), float32."""
        shape = (*self.kernel_size, in_features, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        return kernel, self.param("bias", self.bias_init, (self.features,), jnp.float32)


class PatchEmbed(nn.Module):
    """Two-conv stem: ConvNorm(D/2, k, s) -> act -> ConvNorm(D, 3, 2).

    Plain ViG ("v2" patch embed, stride 16): k=9, s=8, act=SiLU.
    ViG-H stem (stride 4): k=3, s=2, act=GELU.
    `first_impl`: one of CONV_IMPLS (see `ConvNorm`) for the first, 3-channel convolution.
    """

    embed_dim: int
    first_kernel: int
    first_stride: int
    act: Callable[[jax.Array], jax.Array]
    dtype: jnp.dtype = jnp.float32
    first_impl: str = "conv"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: [B, H, W, 3] -> [B, h, w, D]."""
        x = ConvNorm(
            self.embed_dim // 2,
            self.first_kernel,
            self.first_stride,
            self.dtype,
            self.first_impl,
            name="stage1",
        )(images)
        x = self.act(x)
        return ConvNorm(self.embed_dim, 3, 2, self.dtype, name="stage2")(x)
