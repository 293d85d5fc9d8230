"""vig_jax/models/gla.py: the GLA layer against an independent float64 numpy transcription.

`gla_by_hand` is docs/architecture.md's GLA layer written out in numpy (depthwise conv as nine
shifted products, the token recurrence as a Python loop): it shares no code with the layer. Two
regimes:
- float64, small activations: the BiGLA output and xs have an RMS near sqrt(eps) = 1e-3, where the
  RMSNorm eps and the mean (not sum) of the two directions change the result; at unit scale the
  norm after BiGLA cancels both up to its eps.
- bfloat16 at ViG-T's size (D 192, 3 heads, 14x14 tokens): the output error against float64 has
  a tolerance set from its measured value, and the float32 islands of the layer (gate log-sigmoid,
  RMSNorm statistics) are checked where they happen, against the layer's own bf16 inputs.
The layer's speed switches (the GatedLinearAttention fields besides the recipe's) are parametrized:
every form must compute the same function.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.helpers import assert_close, patch_bigla, rel_err
from vig_jax.models import gla

EPS = 1e-6  # RMSNorm eps of the spec
_FIELDS = {f.name for f in dataclasses.fields(gla.GatedLinearAttention)}
# Forms of the layer that must compute the same function (present ones only: the model is being
# given speed switches; a switch that does not exist yet is left out).
_FORMS = {
    "fused_proj": {"fused_proj": True},
    "dwconv_shift": {"dwconv": "shift"},
    "fp32_mix": {"fp32_mix": True},
}
FORMS = {"default": {}} | {name: form for name, form in _FORMS.items() if set(form) <= _FIELDS}
if len(FORMS) > 2:
    FORMS["all_switches"] = {k: v for form in list(FORMS.values()) for k, v in form.items()}


# ------------------------------------------------------------------- the layer by hand (float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _bigla(q, k, v, gf, gb, *, directions="mean"):
    """Both gated recurrences over tokens, per batch and head; o = (o_f + o_b) / 2."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    out = np.zeros((B, N, H, V))
    for gates, order in ((gf, range(N)), (gb, range(N - 1, -1, -1))):
        state = np.zeros((B, H, K, V))
        for t in order:
            state = np.exp(gates[:, t])[..., None] * state
            state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
            out[:, t] += np.einsum("bhk,bhkv->bhv", q[:, t], state)
    return out / 2 if directions == "mean" else out


def gla_by_hand(params, x, num_heads, *, act_in_conv, out_act, eps=EPS, directions="mean"):
    """The GLA layer in float64 numpy. x: [B, h, w, D] -> (out [B, h, w, D], parts dict)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    B, h, w, D = x.shape
    H, N = num_heads, h * w
    key_dim = D // 2
    K, V = key_dim // H, D // H
    # 1. depthwise 3x3, zero padding 1, no bias (cross-correlation, as torch and flax).
    kernel = p["dwconv"]["kernel"]  # [3, 3, 1, D]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xs = sum(xp[:, i : i + h, j : j + w] * kernel[i, j, 0] for i in range(3) for j in range(3))
    if act_in_conv:
        xs = _silu(xs)
    xs = xs.reshape(B, N, D)
    # 2. [q | k | v] without bias; 4. q scaled by K^-1/2; heads are head-major.
    qkv = xs @ p["qkv"]["kernel"]
    q = qkv[..., :key_dim].reshape(B, N, H, K) * K**-0.5
    k = qkv[..., key_dim : 2 * key_dim].reshape(B, N, H, K)
    v = qkv[..., 2 * key_dim :].reshape(B, N, H, V)
    # 3. gates: low rank 16, bias on the second; log_sigmoid / 16; forward half first.
    logits = xs @ p["gate_down"]["kernel"] @ p["gate_up"]["kernel"] + p["gate_up"]["bias"]
    gates = -np.logaddexp(0.0, -logits) / 16.0
    gf = gates[..., :key_dim].reshape(B, N, H, K)
    gb = gates[..., key_dim:].reshape(B, N, H, K)
    # 5.-7. BiGLA, per-head RMSNorms (one weight of size V), sigmoid mix with xs.
    o = _bigla(q, k, v, gf, gb, directions=directions)
    o_norm = _rms_norm(o, p["o_norm"]["scale"], eps)
    local = _rms_norm(xs.reshape(B, N, H, V), p["local_norm"]["scale"], eps)
    mix = _sigmoid(xs @ p["mix_gate"]["kernel"] + p["mix_gate"]["bias"]).reshape(B, N, H, V)
    y = (o_norm * mix + local * (1 - mix)).reshape(B, N, D)
    if out_act:
        y = _silu(y)
    out = (y @ p["out"]["kernel"]).reshape(B, h, w, D)
    return out, {"o": o, "local_rms": np.sqrt(np.mean(xs**2))}


# --------------------------------------------------------------------------------- utilities


def make_layer(num_heads, dtype, form, *, act=True, impl="reference"):
    return gla.GatedLinearAttention(
        num_heads=num_heads,
        use_act_in_conv=act,
        use_out_act=act,
        xavier_init=True,
        bigla_impl=impl,
        dtype=dtype,
        **form,
    )


def random_params(layer, x, seed):
    """Every parameter random (non-trivial norm scales and biases), float32 values, init's layout.

    Kernels ~ N(0, 1/fan_in) as a unit-gain init; biases ~ N(0, 0.5), norm scales ~ 1 + N(0, 0.3).
    """
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), x))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = np.prod(leaf.shape[:-1]) if "dwconv" not in name else 9
            value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        elif "bias" in name:
            value = rng.normal(size=leaf.shape) * 0.5
        else:
            value = 1.0 + rng.normal(size=leaf.shape) * 0.3
        return np.asarray(value, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ------------------------------------------------------------- float64, small-activation regime

F64_TOL = 1e-10  # float64 layer vs float64 numpy: summation order only
SMALL_B, SMALL_H, SMALL_W, SMALL_D, SMALL_HEADS = 2, 3, 4, 16, 2  # K 4, V 8, 12 tokens
# Input scale and q/k/v kernel gain putting the RMS of xs (1.1e-3) and of the BiGLA output
# (8e-4, cubic in the input) near sqrt(eps) = 1e-3.
SMALL_SCALE, QKV_GAIN = 3e-3, 50.0


# Every form with the reference BiGLA; the chunked one (the CPU's) with no switch and with all.
F64_CASES = [(name, "reference") for name in FORMS] + [
    (name, "chunked") for name in FORMS if name in ("default", "all_switches")
]


@pytest.mark.parametrize("form_name, impl", F64_CASES, ids=[f"{f}-{i}" for f, i in F64_CASES])
def test_gla_layer_float64_equals_transcription_where_eps_and_mean_matter(x64, form_name, impl):
    layer = make_layer(SMALL_HEADS, jnp.float64, FORMS[form_name], impl=impl)
    rng = np.random.default_rng(0)
    x = SMALL_SCALE * rng.normal(size=(SMALL_B, SMALL_H, SMALL_W, SMALL_D))
    params = random_params(layer, x, seed=1)
    params["qkv"]["kernel"] = params["qkv"]["kernel"] * np.float32(QKV_GAIN)
    got = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, jnp.asarray(x))
    assert got.dtype == jnp.float64
    want, parts = gla_by_hand(params, x, SMALL_HEADS, act_in_conv=True, out_act=True)
    # The regime: both normalised tensors have an RMS within a factor 3 of sqrt(eps).
    for name, rms in (("o", np.sqrt(np.mean(parts["o"] ** 2))), ("xs", parts["local_rms"])):
        assert 3e-4 < rms < 3e-3, f"{name} RMS {rms:.1e} is not near sqrt(eps)"
    assert_close("GLA layer", got, want, F64_TOL)
    # Negative controls: a summed BiGLA or a 10x larger eps moves the output by > 1e-3.
    for wrong in (dict(directions="sum"), dict(eps=1e-5)):
        other, _ = gla_by_hand(params, x, SMALL_HEADS, act_in_conv=True, out_act=True, **wrong)
        assert rel_err(other, want) > 1e-3, wrong


@pytest.mark.parametrize("act", [False, True], ids=["vig_s", "vig_t"])
def test_gla_layer_float64_activations_switch(x64, act):
    # use_act_in_conv / use_out_act (ViG-T only), at unit scale.
    layer = make_layer(SMALL_HEADS, jnp.float64, {}, act=act)
    x = np.random.default_rng(2).normal(size=(SMALL_B, SMALL_H, SMALL_W, SMALL_D))
    params = random_params(layer, x, seed=3)
    got = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, jnp.asarray(x))
    want, _ = gla_by_hand(params, x, SMALL_HEADS, act_in_conv=act, out_act=act)
    assert_close("GLA layer", got, want, F64_TOL)
    other, _ = gla_by_hand(params, x, SMALL_HEADS, act_in_conv=not act, out_act=not act)
    assert rel_err(other, want) > 1e-2


# ------------------------------------------------------------------- bfloat16 at ViG-T's size

BF16_SHAPE, BF16_HEADS = (2, 14, 14, 192), 3  # ViG-T: D 192, K 32, V 64, 196 tokens
# RMS of (bf16 layer - float64 transcription) / RMS of the transcription, init params, unit
# input, measured on CPU: 6.2e-3 default, 5.3e-3 with every switch (reference and chunked BiGLA
# alike; max elementwise 6.7e-3 of the largest). A float32
# layer is at ~1e-6: the error must also stay above 1e-3 (the layer does compute in bf16).
BF16_RMS_TOL = 8e-3
BF16_UNIT = 2.0**-8  # bf16 unit roundoff: |round(y) - y| <= 2^-8 |y|
F32_ISLAND_TOL = 1e-6  # float32 maths on bf16 inputs: ~2e-7 measured


def _bf16_case(form, impl="reference", init=True):
    layer = make_layer(BF16_HEADS, jnp.bfloat16, form, impl=impl)
    x = np.random.default_rng(0).normal(size=BF16_SHAPE).astype(np.float32)
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # the bf16 values, exactly
    if init:
        params = jax.jit(layer.init)(jax.random.key(0), x)["params"]
    else:
        params = random_params(layer, x, seed=1)
    return layer, params, x


@pytest.mark.parametrize(
    "form", [FORMS["default"], FORMS.get("all_switches", {})], ids=["default", "all_switches"]
)
def test_gla_layer_bf16_error_against_float64_at_vig_t_size(form):
    # Chunked BiGLA, the CPU's: the reference scan gives the same error (both accumulate in f32).
    layer, params, x = _bf16_case(form, impl="chunked")
    got = jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    want, _ = gla_by_hand(params, x, BF16_HEADS, act_in_conv=True, out_act=True)
    err = np.sqrt(np.mean((np.asarray(got, np.float64) - want) ** 2) / np.mean(want**2))
    assert 1e-3 < err < BF16_RMS_TOL, f"RMS relative error {err:.2e}"


@pytest.mark.parametrize(
    "form", [FORMS["default"], FORMS.get("fp32_mix", {})], ids=["default", "fp32_mix"]
)
def test_gla_layer_bf16_keeps_gates_and_norm_statistics_in_float32(form, monkeypatch):
    # Each float32 island checked on the layer's own bf16 inputs: the BiGLA gates against
    # log_sigmoid(gate_up's bf16 logits) / 16 in float64, the two RMSNorms against float64 norms
    # of their bf16 inputs. In bf16 either would be off by up to ~2^-8 relative (measured 6e-3
    # for the gates, 1.5e-2 for the norms); in float32 the gates are off by ~2e-7, a bf16 norm
    # output by at most its final rounding (2^-8), a float32 one (fp32_mix) by ~2e-7.
    layer, params, x = _bf16_case(form, init=False)  # non-trivial norm scales and gate biases
    calls, gates = {}, []

    def record_calls(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name:
            calls[context.module.name] = (args, out)
        return out

    def record_bigla(q, k, v, gf, gb, **kwargs):
        gates.extend([gf, gb])
        calls["bigla"] = bigla(q, k, v, gf, gb, **kwargs)
        return calls["bigla"]

    bigla = gla.bigla
    patch_bigla(monkeypatch, record_bigla)
    with nn.intercept_methods(record_calls):
        layer.apply({"params": params}, jnp.asarray(x, jnp.bfloat16))

    logits = np.asarray(calls["gate_up"][1], np.float64)  # [B, N, 2 key_dim], bf16 values
    want = -np.logaddexp(0.0, -logits) / 16.0
    got = np.concatenate(
        [np.asarray(g, np.float64).reshape(logits.shape[:2] + (-1,)) for g in gates], -1
    )
    assert np.max(np.abs(got - want) / np.abs(want)) < F32_ISLAND_TOL, "gates"
    if form.get("fp32_mix"):  # norms, mix and SiLU in float32 (norm_mix), rounded once
        o = np.asarray(calls["bigla"], np.float64)  # [B, N, H, V]
        (xs,), mix_logits = (np.asarray(a, np.float64) for a in calls["mix_gate"])
        split = lambda a: a.reshape(o.shape)
        norm = lambda y, name: (
            y
            / np.sqrt(np.mean(y * y, -1, keepdims=True) + EPS)
            * params[name]["scale"].astype(np.float64)
        )
        mix = _sigmoid(split(mix_logits))
        want = _silu(norm(o, "o_norm") * mix + norm(split(xs), "local_norm") * (1 - mix))
        (got,), _ = calls["out"]
        got = np.asarray(got, np.float64).reshape(o.shape)
        assert got.dtype == np.float64 and calls["out"][0][0].dtype == jnp.bfloat16
        big = np.abs(want) > 1e-3 * np.abs(want).max()
        err = np.max(np.abs(got - want)[big] / np.abs(want)[big])
        assert err < BF16_UNIT * (1 + 1e-3), f"fp32 mix chain: elementwise relative error {err:.2e}"
        return
    for name in ("o_norm", "local_norm"):
        (inputs,), out = calls[name]
        y = np.asarray(inputs, np.float64)
        want = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + EPS) * params[name]["scale"]
        big = np.abs(want) > 1e-3 * np.abs(want).max()
        err = np.max(np.abs(np.asarray(out, np.float64) - want)[big] / np.abs(want)[big])
        tol = BF16_UNIT * (1 + 1e-3) if out.dtype == jnp.bfloat16 else F32_ISLAND_TOL
        assert err < tol, f"{name} ({out.dtype}): elementwise relative error {err:.2e}"
