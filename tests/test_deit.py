"""DeiT baseline: parameter counts, a float64 numpy forward, padded attention, dtypes and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from vig_jax.models.deit import VARIANTS, DeiT
from vig_jax.models.pos_embed import bicubic_matrix

TINY = dict(num_classes=10, embed_dim=32, depth=2, num_heads=2)


def _images(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _variables(model, images, seed=1):
    """Random variables of the right shapes, drawn in numpy.

    Compiling `model.init` (threefry for each parameter) costs seconds of CPU per test, and non-zero
    biases and LayerNorm affines exercise more of the forward than the real init would.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize(
    "name, count", [("deit_t", 5_717_416), ("deit_s", 22_050_664), ("deit_b", 86_567_656)]
)
def test_deit_param_count_matches_architecture(name, count):
    # Counts worked out by hand from the architecture (DeiT paper: 5.7M / 22M / 86M).
    cls, defaults = VARIANTS[name]
    model = cls(num_classes=1000, **defaults)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == count


def _numpy_deit(p, images, num_heads):
    """Independent float64 DeiT forward (timm semantics); images [B, Hi, Wi, 3] -> logits [B, C]."""
    from math import erf

    def ln(x, q):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def dense(x, q):
        return x @ q["kernel"] + q["bias"]

    gelu = np.vectorize(lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))))
    b, hi, wi, _ = images.shape
    kernel = p["patch_embed"]["kernel"]  # [P, P, 3, D]
    ps, d = kernel.shape[0], kernel.shape[-1]
    h, w = hi // ps, wi // ps
    patches = images[:, : h * ps, : w * ps].reshape(b, h, ps, w, ps, 3).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(b, h * w, -1) @ kernel.reshape(-1, d) + p["patch_embed"]["bias"]
    pos = p["pos_embed"][0]  # [1 + h0*w0, D]
    h0 = w0 = math.isqrt(pos.shape[0] - 1)
    grid = np.einsum(
        "ai,ijd,bj->abd", bicubic_matrix(h0, h), pos[1:].reshape(h0, w0, d), bicubic_matrix(w0, w)
    )
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, d)), x], 1)
    x = x + np.concatenate([pos[:1], grid.reshape(h * w, d)])[None]
    k = d // num_heads
    for i in range(sum(name.startswith("block") for name in p)):
        q = p[f"block{i}"]
        qkv = dense(ln(x, q["norm1"]), q["attn"]["qkv"]).reshape(b, -1, 3, num_heads, k)
        s = np.einsum("bqhk,bshk->bhqs", qkv[:, :, 0], qkv[:, :, 1]) / math.sqrt(k)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", a, qkv[:, :, 2]).reshape(b, -1, d)
        x = x + dense(o, q["attn"]["proj"])
        x = x + dense(gelu(dense(ln(x, q["norm2"]), q["mlp"]["fc1"])), q["mlp"]["fc2"])
    return dense(ln(x, p["norm"])[:, 0], p["head"])


@pytest.mark.parametrize(
    "image_hw", [(64, 64), (48, 80)], ids=["grid4x4_resized", "grid3x5_resized"]
)
def test_deit_matches_numpy_forward_float64(x64, image_hw):
    model = DeiT(**TINY, dtype=jnp.float64)
    images = _images((2, *image_hw, 3), jnp.float64)
    variables = _variables(model, images)
    got = jax.jit(lambda v: model.apply(v, images, train=False))(variables)
    params = jax.tree.map(np.asarray, variables["params"])
    want = _numpy_deit(params, np.asarray(images), TINY["num_heads"])
    # jax.nn.dot_product_attention's XLA path forms the scores in float32 even for float64 inputs,
    # which bounds the agreement at ~1e-7; an architectural error would be O(1).
    assert_close("logits", got, want, 1e-6)


def _logits(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def test_deit_padded_attention_equals_unpadded():
    # 48x80 -> 3x5 grid -> 16 tokens with the class token, padded to 64 inside attention as for
    # cuDNN; logits and every parameter gradient must match the unpadded model.
    images = _images((2, 48, 80, 3))
    plain = DeiT(**TINY)
    padded = DeiT(**TINY, token_multiple=64)
    variables = _variables(plain, images)
    cotangent = jax.random.normal(jax.random.key(3), (2, TINY["num_classes"]))

    def logits_and_grads(model):
        f = lambda v: model.apply(v, images, train=False)
        logits, vjp = jax.vjp(f, variables)
        return logits, vjp(cotangent)[0]

    want, want_grads = jax.jit(lambda: logits_and_grads(plain))()
    got, got_grads = jax.jit(lambda: logits_and_grads(padded))()
    assert_close("logits", got, want, 1e-5)
    flat_want = jax.tree.leaves(want_grads)
    flat_got = jax.tree_util.tree_leaves_with_path(got_grads)
    for (path, g), w in zip(flat_got, flat_want, strict=True):
        assert_close(f"grad {jax.tree_util.keystr(path)}", g, w, 1e-5)


def test_deit_padding_is_masked():
    # Negative control for the test above: padding without the key mask must change the logits,
    # so the padded-equals-unpadded check can fail.
    images = _images((2, 48, 80, 3))
    model = DeiT(**TINY, token_multiple=64)
    variables = _variables(model, images)
    want = _logits(DeiT(**TINY), variables, images)
    real_attention = jax.nn.dot_product_attention

    def unmasked(*args, key_value_seq_lengths, **kw):
        assert key_value_seq_lengths is not None  # the padded model does pass a mask
        return real_attention(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.nn, "dot_product_attention", unmasked)
        got = _logits(model, variables, images)
    assert np.abs(np.asarray(got - want)).max() > 1e-2 * np.abs(np.asarray(want)).max()


def test_deit_bfloat16_compute_float32_params():
    images = _images((2, 64, 64, 3))
    model = DeiT(**TINY, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = _variables(model, images)
    got = _logits(model, variables, images)
    want = _logits(DeiT(**TINY), variables, images)
    assert got.dtype == jnp.float32
    assert_close("bf16 logits", got, want, 5e-2)


@pytest.mark.parametrize(
    "fields, shape, match",
    [
        (dict(attention_impl="flash"), (1, 32, 32, 3), "attention_impl"),
        (dict(token_multiple=0), (1, 32, 32, 3), "token_multiple"),
        (dict(num_heads=3), (1, 32, 32, 3), "divisible"),
        ({}, (1, 32, 32), "NHWC"),
        ({}, (1, 8, 32, 3), "patch"),
    ],
)
def test_deit_bad_input_raises(fields, shape, match):
    model = DeiT(**{**TINY, **fields})
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
