"""Bidirectional gated linear attention (BiGLA), the token mixer of ViG.

`bigla` checks its inputs once and dispatches to one of these implementations, which take and return
the same arrays:
  reference  `lax.scan` over tokens, straight from the recurrence: the definition of correct.
  chunked    pure-jnp chunked form (intra-chunk matmuls + inter-chunk states): runs anywhere.
  pallas     one Pallas GPU (Triton) kernel computing both directions, with its own backward.
  mosaic     experimental: the forward as a Pallas Mosaic GPU kernel for Hopper (sm_90), the
             backward from the pallas kernels; bf16 only. "auto" picks it only where
             `auto_table` (measured by benchmarks/bench_bigla.py) says it is faster.

`bigla_logits` takes the gate logits instead of the log gates (the pallas path computes the gates
inside its kernels); `bigla_packed` takes q, k, v as one [B, N, .] array and both gates as another,
as a model's projections produce them (the pallas path reads them in place).

Under a mesh (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` while tracing, as
`vig_jax.train.trainer` does) the pallas path runs per shard of the batch; see `_per_batch_shard`.
"""

import math
import numbers

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.bigla.reference import bigla_reference

IMPLS = ("auto", "reference", "chunked", "pallas", "mosaic")
CHUNKED_CHUNK = 64  # the chunked path's default chunk size
_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _check_chunk_size(chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer or None")


def _check(q, k, v, gf, gb, impl, chunk_size, interpret):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, N, H, K], got {q.shape=}")
    for name, x in (("k", k), ("gf", gf), ("gb", gb)):
        if x.shape != q.shape:
            raise ValueError(f"{name}.shape={x.shape} must equal {q.shape=}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, N, H, V] with B, N, H of q; got {v.shape=}, {q.shape=}")
    for name, x in (("q", q), ("k", k), ("v", v), ("gf", gf), ("gb", gb)):
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name}.dtype={x.dtype} is not a float dtype of {_FLOATS}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    _check_chunk_size(chunk_size)
    if interpret and impl != "pallas":
        raise ValueError(f"interpret=True applies to impl='pallas' only, got impl={impl!r}")


def _check_pallas_backend(interpret):
    if not interpret and jax.default_backend() != "gpu":
        raise ValueError(
            f"impl='pallas' needs a GPU (backend is {jax.default_backend()!r}); "
            "pass interpret=True to run the kernel in Pallas interpret mode, or use impl='chunked'"
        )


def _per_batch_shard(fn, *arrays, replicated=()):
    """`fn(*arrays, *replicated)`, run by each device on its slice of the batch of `arrays` (and
    all of `replicated`) when a mesh is in context.

    A Pallas call is opaque to XLA's SPMD partitioner, which therefore gathers the operands of a
    batch-sharded kernel onto every device and computes the whole batch on each. Under a context
    mesh of more than one device the kernel runs in `jax.shard_map` with the batch axis split
    over all mesh axes, the layout of `vig_jax.train.sharding`; operands laid out otherwise are
    resharded to it first, so the result does not depend on the layout, only the cost does.
    Without a mesh, on one device, or when B does not divide over the devices, `fn` runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or arrays[0].shape[0] % mesh.size:
        return fn(*arrays, *replicated)
    spec = PartitionSpec(mesh.axis_names)
    in_specs = (spec,) * len(arrays) + (PartitionSpec(),) * len(replicated)
    # check_vma=False: pallas_call has no rule for varying-manual-axes types.
    run = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
    return run(*arrays, *replicated)


def _device():
    """(device kind, compute capability) of the first device, e.g. ("NVIDIA H200", "9.0")."""
    device = jax.devices()[0]
    return device.device_kind, getattr(device, "compute_capability", None)


def _check_mosaic_backend():
    capability = _device()[1]
    if jax.default_backend() != "gpu" or capability != "9.0":
        raise ValueError(
            "impl='mosaic' needs a Hopper GPU (compute capability 9.0); got backend "
            f"{jax.default_backend()!r}, compute capability {capability!r}: use impl='pallas'"
        )


def _measured_impl(device_kind, K, V, N, BH):
    """The impl of `auto_table.ROWS`' row for this GPU and head dims nearest in (log N, log B·H),
    or None when no row has them."""
    from pallas_kernels.bigla import auto_table

    rows = [r for r in auto_table.ROWS if (r["device"], r["K"], r["V"]) == (device_kind, K, V)]
    if not rows:
        return None
    far = lambda r: abs(math.log(r["N"] / N)) + abs(math.log(r["BH"] / BH))
    return min(rows, key=far)["impl"]


def _auto_impl(shape, V, dtype, chunk_size, mosaic_ok=True):
    """On a GPU: the measured faster kernel (`auto_table`) where Mosaic GPU can run it (Hopper,
    bf16, its head dims, no chunk_size given), else pallas where the kernel takes the head dims and
    chunk size; chunked otherwise (and off the GPU)."""
    if jax.default_backend() != "gpu":
        return "chunked"
    from pallas_kernels.bigla.pallas import KernelParams, supports

    B, N, H, K = shape
    if mosaic_ok and chunk_size is None and dtype == jnp.bfloat16:
        kind, capability = _device()
        if capability == "9.0" and _measured_impl(kind, K, V, N, B * H) == "mosaic":
            from pallas_kernels.bigla import mosaic

            if mosaic.supports(K, V):
                return "mosaic"
    chunk = KernelParams().chunk if chunk_size is None else chunk_size
    return "pallas" if supports(K, V, chunk) else "chunked"


def bigla(q, k, v, gf, gb, *, impl="auto", chunk_size=None, interpret=False, save_states=True):
    """o = (o_fwd + o_bwd) / 2 of the two gated linear recurrences (see `bigla_reference`).

    Args:
      q, k: [B, N, H, K]; the 1/sqrt(K) scaling of q is the caller's.
      v: [B, N, H, V], same dtype as q and k (float16, bfloat16, float32 or float64).
      gf, gb: [B, N, H, K] log-space gates (<= 0) of the forward and backward direction, any float
        dtype; pass float32 for low-precision q/k/v.
      impl: "auto" (on a GPU pallas for the head dims and chunk sizes it takes, see
        `pallas.supports`, or mosaic where `auto_table` measured it faster; chunked otherwise),
        "reference", "chunked", "pallas" or "mosaic" (experimental, Hopper only:
        `mosaic.bigla_mosaic`; chunk_size does not apply).
      chunk_size: tokens per chunk of the chunked and pallas paths (any N works); None: each
        implementation's default (chunked 64, pallas `KernelParams().chunk`).
      interpret: run the pallas kernels in Pallas interpret mode (CPU tests); impl="pallas" only.
      save_states: pallas path: keep the forward's chunk states for the backward
        (`KernelParams.save_states`, default: less backward work, more activation memory; False
        recomputes them); the other implementations ignore it (chunked's autodiff keeps what its
        backward needs).

    Returns:
      o: [B, N, H, V] in the dtype of v, accumulated in float32 (float64 for float64 inputs).

    Raises:
      ValueError: on mismatched shapes or dtypes, an unknown impl, or pallas without a GPU.
    """
    _check(q, k, v, gf, gb, impl, chunk_size, interpret)
    if impl == "auto":
        impl = _auto_impl(q.shape, v.shape[-1], q.dtype, chunk_size)
    if impl == "reference":
        return bigla_reference(q, k, v, gf, gb)
    if impl == "chunked":
        from pallas_kernels.bigla.chunked import bigla_chunked

        return bigla_chunked(q, k, v, gf, gb, chunk_size=chunk_size or CHUNKED_CHUNK)
    if impl == "mosaic":
        _check_mosaic_backend()
        from pallas_kernels.bigla.mosaic import bigla_mosaic

        return _per_batch_shard(bigla_mosaic, q, k, v, gf, gb)
    _check_pallas_backend(interpret)
    from pallas_kernels.bigla.pallas import _params, bigla_pallas

    params = _params(None, chunk_size, interpret, save_states)

    def kernel(*arrays):
        return bigla_pallas(*arrays, params=params)

    return _per_batch_shard(kernel, q, k, v, gf, gb)


def bigla_logits(
    q,
    k,
    v,
    xf,
    xb,
    *,
    normalizer=16.0,
    impl="auto",
    chunk_size=None,
    interpret=False,
    save_states=True,
):
    """`bigla` with the gates given as logits: gf = log_sigmoid(xf) / normalizer, gb likewise.

    The pallas path computes the gates inside its kernels (`pallas.bigla_pallas_logits`: no
    float32 gate tensors in HBM); the others compute them in XLA, in float32 (float64 for float64
    logits), as ViG's gate projection does. xf, xb: [B, N, H, K] logits, any float dtype; their
    gradients come back in their dtypes. Other arguments, result and errors as `bigla`.
    """
    if not normalizer > 0:
        raise ValueError(f"normalizer={normalizer!r} must be positive")
    _check(q, k, v, xf, xb, impl, chunk_size, interpret)
    if impl == "auto":  # the Mosaic path has no gates-from-logits entry
        impl = _auto_impl(q.shape, v.shape[-1], q.dtype, chunk_size, mosaic_ok=False)
    if impl != "pallas":
        acc = jnp.promote_types(xf.dtype, jnp.float32)
        gf, gb = (jax.nn.log_sigmoid(x.astype(acc)) / normalizer for x in (xf, xb))
        return bigla(q, k, v, gf, gb, impl=impl, chunk_size=chunk_size)
    _check_pallas_backend(interpret)
    from pallas_kernels.bigla.pallas import _params, bigla_pallas_logits

    params = _params(None, chunk_size, interpret, save_states)

    def kernel(*arrays):
        return bigla_pallas_logits(*arrays, normalizer=normalizer, params=params)

    return _per_batch_shard(kernel, q, k, v, xf, xb)


def bigla_packed(
    qkv,
    gates,
    *,
    num_heads,
    key_dim,
    q_scale=1.0,
    normalizer=None,
    impl="auto",
    chunk_size=None,
    interpret=False,
    save_states=True,
):
    """`bigla` (with `normalizer`, `bigla_logits`) on the arrays a model's projections produce.

    qkv: [B, N, 2 key_dim + H V] = [q | k | v], each head-major (channel = head * d + i), q read
    as q * q_scale rounded to qkv's dtype (ViG: K^-1/2); gates: [B, N, 2 key_dim] = [gf | gb],
    log gates, or logits when `normalizer` is set. The pallas path reads q, k, v and the gates in
    place and its backward writes dqkv and dgates whole (`pallas.bigla_pallas_packed`): no XLA
    pass slices them apart or concatenates their gradients. The other implementations get the
    slices. Returns o [B, N, H, V] in qkv.dtype; other arguments and errors as `bigla`.
    """
    from pallas_kernels.bigla.pallas import check_packed, split_packed

    K, V = check_packed(qkv, gates, num_heads, key_dim)
    B, N, _ = qkv.shape
    for name, x in (("qkv", qkv), ("gates", gates)):
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name}.dtype={x.dtype} is not a float dtype of {_FLOATS}")
    if impl == "auto":  # the Mosaic path reads separate arrays: pallas or chunked
        impl = _auto_impl((B, N, num_heads, K), V, qkv.dtype, chunk_size, mosaic_ok=False)
    if impl != "pallas":
        arrays = split_packed(qkv, gates, num_heads, key_dim, q_scale)
        run = dict(impl=impl, chunk_size=chunk_size, interpret=interpret, save_states=save_states)
        if normalizer is None:
            return bigla(*arrays, **run)
        return bigla_logits(*arrays, normalizer=normalizer, **run)
    _check_chunk_size(chunk_size)
    _check_pallas_backend(interpret)
    from pallas_kernels.bigla.pallas import _params, bigla_pallas_packed

    params = _params(None, chunk_size, interpret, save_states)
    layout = dict(num_heads=num_heads, key_dim=key_dim, q_scale=q_scale, normalizer=normalizer)

    def kernel(qkv, gates):
        return bigla_pallas_packed(qkv, gates, params=params, **layout)

    return _per_batch_shard(kernel, qkv, gates)


__all__ = ["IMPLS", "bigla", "bigla_logits", "bigla_packed", "bigla_reference"]
