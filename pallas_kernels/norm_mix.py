"""The GLA layer's output mix as one Pallas GPU (Triton) kernel: kernel, launcher, custom_vjp and
reference together.

    y = RMSNorm_V(o) * sigmoid(m) + RMSNorm_V(xs) * (1 - sigmoid(m)),   then SiLU(y) if `out_act`

per token and head: o is BiGLA's output [B, N, H, V], xs the depthwise-conv features and m the mix
gate's logits, both [B, N, H * V] seen as [B, N, H, V]; RMSNorm_V normalises each head's V values
(x / sqrt(mean(x^2) + eps) * scale, one scale of size V for all heads). Everything runs in float32
and is rounded to xs's dtype once (the layer's `fp32_mix` form).

XLA runs this chain as a row reduction over rows of V = 64 values plus elementwise passes; at ViG-S
224² on an H200 they moved about 1.5x the bytes of one pass and reached ~1.9 TB/s (profile_step).
The kernel reads o, xs and m once and writes y once: one program per 64 tokens of one (b, h).

The backward is a second kernel of the same shape (the gradients of o, xs and m per row, and each
program's partial sums of the two scales' gradients, summed in XLA), or with
`backward="reference"` XLA's vjp of the reference. Under a mesh both run per shard of the batch,
as BiGLA's kernels do (`bigla._per_batch_shard`). On an H200 the layer with both kernels inferred
3-4% faster than the plain bf16 chain and trained as fast or up to 3% faster; with XLA's backward it
had trained 1.5-4% slower (benchmarks/notes_bigla.md, v14 and v15).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.bigla import _per_batch_shard
from pallas_kernels.bigla.pallas import _load_rows, _store_rows, triton_call

IMPLS = ("auto", "reference", "pallas")
BACKWARDS = ("pallas", "reference")
ROWS = 64  # tokens per program
HEAD_DIMS = (16, 32, 64, 128)  # V the kernel takes (Triton blocks are powers of two)


def norm_mix_reference(o, xs, m, o_scale, xs_scale, *, eps, out_act):
    """The definition: o [B, N, H, V]; xs, m [B, N, H * V]; scales [V] -> [B, N, H * V] in xs.dtype.

    Computed in float32 (float64 for float64 inputs) and rounded once.
    """
    B, N, H, V = o.shape
    acc = jnp.promote_types(xs.dtype, jnp.float32)

    def rms(x, scale):
        x = x.astype(acc)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
        return y * scale.astype(acc)

    mix = jax.nn.sigmoid(m.reshape(B, N, H, V).astype(acc))
    y = rms(o, o_scale) * mix + rms(xs.reshape(B, N, H, V), xs_scale) * (1 - mix)
    if out_act:
        y = jax.nn.silu(y)
    return y.reshape(B, N, H * V).astype(xs.dtype)


def _rows(n):
    """(load, store) of this program's ROWS tokens of N = n: load(ref) -> [ROWS, V] float32 (rows
    past N read 0), store(ref, val) writes the rows before N."""
    start = pl.program_id(0) * ROWS
    load = lambda ref: _load_rows(ref, start, ROWS, n).astype(jnp.float32)
    store = lambda ref, val: _store_rows(ref, start, val, n)
    return load, store


def _normed(x, eps):
    """(x * r, r) with r = 1 / sqrt(mean(x^2) + eps) per row."""
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + eps)
    return x * r, r


def _kernel(o_ref, xs_ref, m_ref, os_ref, xss_ref, y_ref, *, n, eps, out_act):
    load, store = _rows(n)
    mix = jax.nn.sigmoid(load(m_ref))
    o_scale, xs_scale = (r[...].astype(jnp.float32)[None, :] for r in (os_ref, xss_ref))
    y = _normed(load(o_ref), eps)[0] * o_scale * mix
    y += _normed(load(xs_ref), eps)[0] * xs_scale * (1.0 - mix)
    if out_act:
        y = y * jax.nn.sigmoid(y)
    store(y_ref, y)


def _bwd_kernel(o_ref, xs_ref, m_ref, os_ref, xss_ref, dy_ref, *out_refs, n, eps, out_act):
    """Gradients of one program's rows: do, dxs, dm, and its partial sums of the two scales'."""
    do_ref, dxs_ref, dm_ref, dos_ref, dxss_ref = out_refs
    load, store = _rows(n)
    mix = jax.nn.sigmoid(load(m_ref))
    o_scale, xs_scale = (r[...].astype(jnp.float32)[None, :] for r in (os_ref, xss_ref))
    o_hat, o_r = _normed(load(o_ref), eps)
    xs_hat, xs_r = _normed(load(xs_ref), eps)
    a, b = o_hat * o_scale, xs_hat * xs_scale  # the two normed branches
    dz = load(dy_ref)
    if out_act:  # d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)
        z = a * mix + b * (1.0 - mix)
        s = jax.nn.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    da, db = dz * mix, dz * (1.0 - mix)
    store(dm_ref, dz * (a - b) * mix * (1.0 - mix))
    for d, hat, r, scale, ref in (
        (da, o_hat, o_r, o_scale, do_ref),
        (db, xs_hat, xs_r, xs_scale, dxs_ref),
    ):
        d_hat = d * scale  # RMSNorm backward: r (d_hat - hat * mean(d_hat * hat))
        store(ref, r * (d_hat - hat * jnp.mean(d_hat * hat, axis=1, keepdims=True)))
    dos_ref[...] = jnp.sum(da * o_hat, axis=0)
    dxss_ref[...] = jnp.sum(db * xs_hat, axis=0)


def _launch(kernel, name, grid, in_specs, out_specs, out_shape, interpret):
    return triton_call(kernel, name, grid, in_specs, out_specs, out_shape, num_warps=4,
                       num_stages=1, interpret=interpret)  # fmt: skip


def _specs(B, N, H, V):
    """Grid (ceil(N / ROWS), B, H) and the block specs of a [B, N, H, V] array (an [N, V] view of
    one (b, h)), of a scale [V] and of per-program partial sums [NC, B, H, V]."""
    grid = (pl.cdiv(N, ROWS), B, H)
    tokens = pl.BlockSpec((None, N, None, V), lambda c, b, h: (b, 0, h, 0))
    scale = pl.BlockSpec((V,), lambda c, b, h: (0,))
    partial = pl.BlockSpec((None, None, None, V), lambda c, b, h: (c, b, h, 0))
    return grid, tokens, scale, partial


def _forward(o, xs, m, o_scale, xs_scale, eps, out_act, interpret):
    B, N, H, V = o.shape
    grid, tokens, scale, _ = _specs(B, N, H, V)
    y = _launch(
        functools.partial(_kernel, n=N, eps=eps, out_act=out_act),
        "norm_mix",
        grid,
        [tokens, tokens, tokens, scale, scale],
        tokens,
        jax.ShapeDtypeStruct(o.shape, xs.dtype),
        interpret,
    )(o, xs.reshape(o.shape), m.reshape(o.shape), o_scale, xs_scale)
    return y.reshape(B, N, H * V)


def _backward(o, xs, m, o_scale, xs_scale, dy, eps, out_act, interpret):
    B, N, H, V = o.shape
    grid, tokens, scale, partial = _specs(B, N, H, V)
    sums = jax.ShapeDtypeStruct((grid[0], B, H, V), jnp.float32)
    do, dxs, dm, dos, dxss = _launch(
        functools.partial(_bwd_kernel, n=N, eps=eps, out_act=out_act),
        "norm_mix_bwd",
        grid,
        [tokens] * 3 + [scale] * 2 + [tokens],
        [tokens] * 3 + [partial] * 2,
        [jax.ShapeDtypeStruct(o.shape, dt) for dt in (o.dtype, xs.dtype, xs.dtype)] + [sums] * 2,
        interpret,
    )(o, xs.reshape(o.shape), m.reshape(o.shape), o_scale, xs_scale, dy.reshape(o.shape))
    flat = (B, N, H * V)
    d_scales = (
        d.sum(axis=(0, 1, 2)).astype(s.dtype) for d, s in ((dos, o_scale), (dxss, xs_scale))
    )
    return (do, dxs.reshape(flat), dm.reshape(flat), *d_scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _norm_mix(o, xs, m, o_scale, xs_scale, eps, out_act, interpret, backward):
    return _forward(o, xs, m, o_scale, xs_scale, eps, out_act, interpret)


def _vjp_fwd(o, xs, m, o_scale, xs_scale, eps, out_act, interpret, backward):
    y = _forward(o, xs, m, o_scale, xs_scale, eps, out_act, interpret)
    return y, (o, xs, m, o_scale, xs_scale)


def _vjp_bwd(eps, out_act, interpret, backward, residuals, dy):
    if backward == "pallas":
        return _backward(*residuals, dy, eps, out_act, interpret)
    ref = functools.partial(norm_mix_reference, eps=eps, out_act=out_act)
    return jax.vjp(ref, *residuals)[1](dy)


_norm_mix.defvjp(_vjp_fwd, _vjp_bwd)


def _takes(V, dtype):
    """Whether the kernel takes head dim V and inputs of `dtype` (16/32-bit floats)."""
    return V in HEAD_DIMS and jnp.dtype(dtype).itemsize <= 4


def kernel_runs(o_shape, dtype, impl="auto", interpret=False):
    """Whether `norm_mix` runs the Pallas kernel for o of this shape and inputs of `dtype` (else the
    reference): impl "pallas", or "auto" on a GPU where `_takes` the head dim and dtype."""
    if impl == "reference":
        return False
    if impl == "pallas" or interpret:
        return True
    return _takes(o_shape[-1], dtype) and jax.default_backend() == "gpu"


def norm_mix(
    o, xs, m, o_scale, xs_scale, *, eps, out_act, impl="auto", interpret=False, backward="pallas"
):
    """The GLA output mix (module docstring); differentiable.

    Args:
      o: [B, N, H, V] BiGLA output, any float dtype.
      xs, m: [B, N, H * V] features and mix-gate logits, one dtype (that of the result).
      o_scale, xs_scale: [V] RMSNorm scales (any float dtype; used in float32).
      eps: RMSNorm epsilon; out_act: SiLU on the result.
      impl: "auto" (the kernel on a GPU where it takes V and the dtype, else the reference),
        "pallas" or "reference".
      interpret: run the kernel in Pallas interpret mode (CPU tests); implies the kernel.
      backward: with the kernel, the gradients from the backward kernel ("pallas", the default;
        compiled and tested on an H200) or from XLA's vjp of the reference ("reference").

    Returns:
      [B, N, H * V] in xs.dtype.

    Raises:
      ValueError: on an unknown impl, mismatched shapes or dtypes, or a V or dtype the kernel
        does not take with impl="pallas".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is not one of {BACKWARDS}")
    if o.ndim != 4:
        raise ValueError(f"o must be [B, N, H, V], got {o.shape=}")
    B, N, H, V = o.shape
    for name, x in (("xs", xs), ("m", m)):
        if x.shape != (B, N, H * V) or x.dtype != xs.dtype:
            raise ValueError(f"{name} must be [B, N, H * V] = {(B, N, H * V)} in {xs.dtype}, "
                             f"got {x.shape} {x.dtype}")  # fmt: skip
    for name, s in (("o_scale", o_scale), ("xs_scale", xs_scale)):
        if s.shape != (V,):
            raise ValueError(f"{name} must be [V] = [{V}], got {s.shape}")
    dtype = jnp.promote_types(o.dtype, xs.dtype)  # 16/32-bit iff both are
    if not kernel_runs(o.shape, dtype, impl, interpret):
        return norm_mix_reference(o, xs, m, o_scale, xs_scale, eps=eps, out_act=out_act)
    if not _takes(V, dtype):
        raise ValueError(f"the norm_mix kernel needs V in {HEAD_DIMS} and 16/32-bit floats; got "
                         f"{V=}, {o.dtype}, {xs.dtype}")  # fmt: skip
    kernel = functools.partial(
        _norm_mix, eps=float(eps), out_act=bool(out_act), interpret=interpret, backward=backward
    )
    return _per_batch_shard(kernel, o, xs, m, replicated=(o_scale, xs_scale))
