"""Execution forms of the models (issue 14) against the plain form: the shifted-add depthwise conv,
the fused projections, the float32 norm/mix chain, per-block remat and the scan over blocks.

Each form keeps the parameter tree and must compute the same function: values and gradients are
compared with the plain form in float64 (tolerance near rounding) and float32, and the golden files
are matched with every form switched on.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict

from tests.conftest import golden_file
from tests.helpers import assert_close, pallas_operand_dtypes, rel_err, sub_eqns
from vig_jax.convert import convert_state_dict
from vig_jax.models import create_model, gla
from vig_jax.models.gla import GatedLinearAttention
from vig_jax.models.layers import (
    CONV_IMPLS,
    ConvNorm,
    DepthwiseConv3x3,
    DropPath,
    SwiGLU,
    conv_blocks,
    depthwise_conv3x3_shift,
)

# err / max|want| of a form against the plain form: float64 is rounding only.
TOL = {"float64": 1e-12, "float32": 2e-5}
ALL_FORMS = dict(
    fused_proj=True,
    dwconv="shift",
    fp32_mix=True,
    gates_in_kernel=True,
    mlp_split_up=True,
    save_states=False,
    bigla_chunk=16,
    stem_impl="patches",
    scan_blocks=True,
    remat="block",
    mix_apart=False,
)
TINY = {
    "vig": ("vig_t", dict(embed_dim=64, depth=3, num_heads=2, drop_path_rate=0.1)),
    "vig_h": ("vig_h_t", dict(dims=(32, 64), depths=(3, 1), num_heads=(1, 2), drop_path_rate=0.1)),
}


def _normal(shape, dtype, seed):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _nn_conv(x, kernel):
    """The plain form: flax's grouped convolution, as the GLA layer had it before the forms."""
    D = x.shape[-1]
    conv = nn.Conv(D, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=D, use_bias=False)
    return conv.apply({"params": {"kernel": kernel}}, x)


def _module(impl):
    def fn(x, kernel):
        module = DepthwiseConv3x3(nn.initializers.zeros, impl, x.dtype)
        return module.apply({"params": {"kernel": kernel}}, x)

    return fn


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 1, 4, 3), (3, 6, 1, 2)], ids=str)
def test_dwconv_shift_matches_conv(shape, dtype, request):
    """Values and both gradients (random cotangent) of the shifted-add form against the conv."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    x = _normal(shape, dtype, 0)
    kernel = _normal((3, 3, 1, shape[-1]), dtype, 1)
    do = _normal(shape, dtype, 2)
    outs = {}
    for name, fn in (("nn.Conv", _nn_conv), ("conv", _module("conv")), ("shift", _module("shift"))):
        y, vjp = jax.vjp(jax.jit(fn), x, kernel)
        outs[name] = (y, *vjp(do))
    for impl in ("conv", "shift"):
        for what, got, want in zip(
            ("y", "dx", "dkernel"), outs[impl], outs["nn.Conv"], strict=True
        ):
            assert_close(f"dwconv {impl} {what} {dtype}", got, want, TOL[dtype])


def test_dwconv_shift_negative_control():
    """The comparison tells a mirrored kernel (a wrong tap order) apart."""
    x = _normal((2, 5, 7, 8), jnp.float32, 0)
    kernel = _normal((3, 3, 1, 8), jnp.float32, 1)
    assert rel_err(depthwise_conv3x3_shift(x, kernel[::-1, ::-1]), _nn_conv(x, kernel)) > 0.1


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "kernel, stride, hw",
    [(9, 8, (37, 30)), (9, 8, (32, 24)), (3, 2, (9, 12)), (3, 2, (8, 6)), (3, 2, (1, 4))],
    ids=str,
)
def test_conv_patches_matches_conv(kernel, stride, hw, dtype, request):
    """ConvNorm's patch-extraction and pixel-block forms against its nn.Conv form (the ViG stem
    k9 s8, the ViG-H stem k3 s2; sizes that are and are not multiples of the stride): values and
    gradients of input, kernel, bias and norm, random cotangent."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    x = _normal((2, *hw, 3), dtype, 0)
    plain = ConvNorm(6, kernel, stride, jnp.dtype(dtype))
    params = plain.init(jax.random.key(0), x)["params"]
    params["norm"] = {k: _normal(v.shape, dtype, 5) for k, v in params["norm"].items()}
    results = {}
    for impl in CONV_IMPLS:
        model = plain.clone(impl=impl)
        y, vjp = jax.vjp(jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)), params, x)
        dparams, dx = vjp(_normal(y.shape, dtype, 9))
        results[impl] = {"y": y, "dx": dx, **flatten_dict(dparams, sep="/")}
    for impl in CONV_IMPLS[1:]:
        assert results[impl]["y"].shape[1:3] == tuple((n + 2 - kernel) // stride + 1 for n in hw)
        for key, want in results["conv"].items():
            assert_close(f"{impl} k{kernel} {key} {dtype}", results[impl][key], want, TOL[dtype])


def test_conv_blocks_negative_control():
    """The comparison tells the block form with one tap row off (the kernel shifted down by one,
    what a wrong padding offset computes) apart from the convolution."""
    x = _normal((2, 37, 30, 3), jnp.float32, 0)
    kernel = _normal((9, 9, 3, 6), jnp.float32, 1)
    want = jax.lax.conv_general_dilated(
        x, kernel, (8, 8), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert_close("blocks", conv_blocks(x, kernel, 8), want, 2e-5)
    shifted = jnp.roll(kernel, 1, axis=0).at[0].set(0)
    assert rel_err(conv_blocks(x, shifted, 8), want) > 0.1


def _activation_concats(jaxpr, width):
    """Concatenations in a jaxpr (and its sub-jaxprs) whose output is an activation of `width`
    channels (rank > 2: not a kernel)."""
    eqns = [*jaxpr.eqns, *sub_eqns(jaxpr)]
    return [
        e
        for e in eqns
        if e.primitive.name == "concatenate"
        and e.outvars[0].aval.ndim > 2
        and e.outvars[0].aval.shape[-1] == width
    ]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_swiglu_split_up_matches_plain(dtype, request):
    """SwiGLU with the up projection as two matmuls: output and gradients (input, both kernels)
    equal the plain form's; its backward has no concatenation of d[a | b] (the plain one has,
    which is what the form removes: the negative control of the structural check)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    x = _normal((2, 5, 7, 16), dtype, 0)
    dy = _normal(x.shape, dtype, 1)
    forms = {k: SwiGLU(24, nn.initializers.normal(1.0), jnp.dtype(dtype), k) for k in (0, 1)}
    params = forms[0].init(jax.random.key(0), x)
    results, concats = {}, {}
    for split, module in forms.items():
        f = lambda p, x, m=module: m.apply(p, x)
        y, vjp = jax.vjp(jax.jit(f), params, x)
        dp, dx = vjp(dy)
        results[split] = {"y": y, "dx": dx, **flatten_dict(dp["params"], sep="/")}
        jaxpr = jax.make_jaxpr(lambda p, x, f=f: jax.vjp(f, p, x)[1](dy))(params, x).jaxpr
        concats[split] = _activation_concats(jaxpr, 2 * 24)
    assert set(results[1]) == set(results[0]) == {"y", "dx", "up/kernel", "down/kernel"}
    for key, want in results[0].items():
        assert_close(f"split_up {key} {dtype}", results[1][key], want, TOL[dtype])
    assert concats[0] and not concats[1], concats


def _gla(dtype, **forms):
    return GatedLinearAttention(
        num_heads=2,
        use_act_in_conv=True,
        use_out_act=True,
        xavier_init=False,  # trunc_normal(0.02) would make the BiGLA branch tiny: unit scale below
        dtype=jnp.dtype(dtype),
        **{"bigla_impl": "reference", **forms},
    )


GLA_FORMS = {
    "fused_proj": dict(fused_proj=True),
    "dwconv_shift": dict(dwconv="shift"),
    "fp32_mix": dict(fp32_mix=True),
    "all": dict(fused_proj=True, dwconv="shift", fp32_mix=True),
    "split_proj": dict(split_proj=True),
    "split_proj_gates_in_kernel": dict(split_proj=True, gates_in_kernel=True),
    # Off the pallas path the gates come from the same XLA ops; the kernel's own gates below.
    "gates_in_kernel": dict(gates_in_kernel=True),
    "unpacked": dict(packed_bigla=False),  # "plain" hands BiGLA qkv and the gates packed
    "compact_gates": dict(compact_gates=True),  # a bf16-only form: float32 and float64 unchanged
    "mix_apart": dict(mix_apart=True),
}


def _gla_outputs_and_grads(forms, dtype, width=16, grid=(4, 6)):
    """{form: {"y", "dx", every parameter's gradient}} of the plain layer and each form in
    `forms`, at unit-scale parameters and a random cotangent; input [2, *grid, width]."""
    x = _normal((2, *grid, width), dtype, 0)
    plain = _gla(dtype)
    shapes = jax.eval_shape(plain.init, jax.random.key(0), x)["params"]
    # Unit-scale parameters, so that every branch (BiGLA, local path, gates) matters.
    leaves, tree = jax.tree.flatten(shapes)
    params = tree.unflatten(
        [_normal(s.shape, dtype, i + 1) / np.sqrt(s.shape[0]) for i, s in enumerate(leaves)]
    )
    do = _normal(x.shape, dtype, 99)
    results = {}
    for name, model in (("plain", plain), *((f, _gla(dtype, **kw)) for f, kw in forms.items())):
        y, vjp = jax.vjp(jax.jit(lambda p, x, m=model: m.apply({"params": p}, x)), params, x)
        dparams, dx = vjp(do)
        results[name] = {"y": y, "dx": dx, **flatten_dict(dparams, sep="/")}
    return results


def test_gla_split_proj_and_packed_backward_concatenate_no_gradients():
    """The reason for split_proj and for packed_bigla on the pallas kernels: the backward of a
    layer whose BiGLA reads q, k, v and the gates as slices concatenates their gradients into the
    projections' outputs; with split_proj (separate projections) or the pallas kernels reading
    them in place (packed_bigla, the default) it does not. The slicing layers, the plain one on
    the reference BiGLA (packed but unpacked by XLA) and the pallas one with packed_bigla=False,
    are the negative controls of the check."""
    x = _normal((1, 4, 4, 64), jnp.float32, 0)
    pallas = dict(bigla_impl="pallas", bigla_interpret=True)
    concats = {}
    forms = {
        "plain": {},
        "unpacked pallas": dict(pallas, packed_bigla=False),
        "split": dict(split_proj=True),
        "packed pallas": pallas,
    }
    for name, kwargs in forms.items():
        model = _gla("float32", **kwargs)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        f = lambda p, x, m=model: m.apply(p, x)
        jaxpr = jax.make_jaxpr(lambda p, x, f=f: jax.vjp(f, p, x)[1](x))(params, x).jaxpr
        concats[name] = {w: _activation_concats(jaxpr, w) for w in (2 * 32 + 64, 2 * 32)}
    for name in ("plain", "unpacked pallas"):  # [dq | dk | dv] and [dxf | dxb]
        assert all(concats[name].values()), (name, concats[name])
    for name in ("split", "packed pallas"):
        assert not any(concats[name].values()), (name, concats[name])


def test_gla_mix_apart_gives_the_mix_gate_matmul_its_own_operand():
    """mix_apart's reason: on a GPU, XLA's dot merger runs matmuls that read the same operand as
    one, and then copies qkv out of the joint output for BiGLA. With mix_apart the mix gate's
    matmul reads the optimization barrier's output; without it (the control) it reads xs, the
    qkv projection's operand, as does the rank-16 gate projection in both."""
    x = _normal((1, 4, 4, 64), jnp.float32, 0)
    for apart in (True, False):
        model = _gla("float32", mix_apart=apart)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        jaxpr = jax.make_jaxpr(model.apply)(params, x).jaxpr
        dots = [e for e in (*jaxpr.eqns, *sub_eqns(jaxpr)) if e.primitive.name == "dot_general"]
        # operand of each projection by its output width: qkv 2 * 32 + 64, gate_down 16, and
        # the [64 -> 64] mix gate and output projections (the output reads BiGLA's mix, not xs)
        (xs,) = {e.invars[0] for e in dots if e.outvars[0].aval.shape[-1] == 128}
        readers = sorted(e.outvars[0].aval.shape[-1] for e in dots if e.invars[0] is xs)
        assert readers == ([16, 128] if apart else [16, 64, 128]), (apart, readers)


def test_gla_fused_and_split_proj_are_exclusive():
    x = _normal((1, 4, 4, 16), jnp.float32, 0)
    with pytest.raises(ValueError, match="fused_proj and split_proj are opposite forms"):
        _gla("float32", fused_proj=True, split_proj=True).init(jax.random.key(0), x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("form", sorted(GLA_FORMS))
def test_gla_form_matches_plain(form, dtype, request):
    """The GLA layer's output and its gradients (input and every parameter) in each form."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    results = _gla_outputs_and_grads({form: GLA_FORMS[form]}, dtype)
    for key, want in results["plain"].items():
        assert_close(f"{form} {key} {dtype}", results[form][key], want, TOL[dtype])


def test_gla_gates_in_kernel_pallas_matches_plain():
    """gates_in_kernel on the pallas kernels (interpret mode; K 16, V 32): gates computed where
    the kernels read them, their gradient through the kernels' chain rule; against the plain
    layer on the reference BiGLA (float32; kernel vs reference differ by ~1e-6). Negative
    control: the kernel's gates with the wrong normalizer (1/8 instead of 1/16) must not pass."""
    pallas = dict(bigla_impl="pallas", bigla_interpret=True)
    forms = {"kernel": dict(gates_in_kernel=True, **pallas), "xla": pallas}
    results = _gla_outputs_and_grads(forms, "float32", width=64)
    for form in forms:
        for key, want in results["plain"].items():
            assert_close(f"{form} {key}", results[form][key], want, 1e-4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gla, "GATE_LOGIT_NORMALIZER", 8.0)
        wrong = _gla_outputs_and_grads({"kernel": forms["kernel"]}, "float32", width=64)
    assert rel_err(wrong["kernel"]["y"], results["plain"]["y"]) > 1e-3


def test_gla_compact_gates_hand_bf16_gates_to_the_kernels():
    """compact_gates in bf16 (pallas, interpret mode): the gates reach the kernels as bf16 (the
    form off, as float32: the control of that check), and output and gradients stay within bf16
    rounding of the form off."""
    pallas = dict(bigla_impl="pallas", bigla_interpret=True)
    x = _normal((2, 4, 4, 64), "bfloat16", 0)
    for compact, want in ((True, "bfloat16"), (False, "float32")):
        model = _gla("bfloat16", compact_gates=compact, **pallas)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        jaxpr = jax.make_jaxpr(lambda p, x, m=model: jax.vjp(m.apply, p, x))(params, x).jaxpr
        # [B, N, 2 key_dim] operands of the kernels: the packed gates
        gates = pallas_operand_dtypes(jaxpr, lambda shape: shape == (2, 16, 64))
        assert gates == {want}, (compact, gates)
    forms = {"compact": dict(compact_gates=True, **pallas), "off": pallas}
    results = _gla_outputs_and_grads(forms, "bfloat16", width=64)
    for key, want in results["off"].items():
        assert_close(f"compact_gates {key}", results["compact"][key], want, 2e-2)


def test_gla_fp32_mix_runs_the_norm_mix_kernel_with_pallas():
    """fp32_mix where BiGLA runs its pallas kernels (interpret mode): the output mix is the
    norm_mix kernel, with values and gradients of the plain layer on the reference BiGLA (float32);
    on the reference BiGLA the same form stays in XLA (no norm_mix kernel)."""
    x = _normal((2, 4, 4, 64), jnp.float32, 0)
    pallas = dict(bigla_impl="pallas", bigla_interpret=True)
    for kwargs, kernel in ((dict(fp32_mix=True, **pallas), True), (dict(fp32_mix=True), False)):
        model = _gla("float32", **kwargs)
        jaxpr = str(jax.make_jaxpr(model.init)(jax.random.key(0), x))
        assert ("norm_mix" in jaxpr) == kernel, kwargs
    results = _gla_outputs_and_grads({"kernel": dict(fp32_mix=True, **pallas)}, "float32", width=64)
    for key, want in results["plain"].items():
        assert_close(f"fp32_mix kernel {key}", results["kernel"][key], want, 1e-4)


def test_gla_pallas_states_saved_or_recomputed_match_plain():
    """The pallas kernels (interpret mode) at 42 tokens, more than one chunk, with the forward's
    states saved (the default: the backward launches only the adjoint states kernel) and
    recomputed (save_states=False): values and gradients as the plain layer on the reference
    BiGLA (float32), and the backward's states kernels are the ones each form names."""
    pallas = dict(bigla_impl="pallas", bigla_interpret=True)
    forms = {"saved": pallas, "recomputed": dict(pallas, save_states=False)}
    results = _gla_outputs_and_grads(forms, "float32", width=64, grid=(6, 7))
    x = _normal((2, 6, 7, 64), jnp.float32, 0)
    for form, kwargs in forms.items():
        for key, want in results["plain"].items():
            assert_close(f"{form} {key}", results[form][key], want, 1e-4)
        model = _gla("float32", **kwargs)
        params = model.init(jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, m=model: jnp.sum(m.apply(p, x))))(params))
        assert ("bigla_bwd_adjoints" in jaxpr) == (form == "saved"), form
        assert ("bigla_bwd_span_summaries" in jaxpr) == (form == "recomputed"), form


@pytest.mark.parametrize("gates_in_kernel", [False, True])
def test_gla_hands_its_bigla_settings_to_the_kernel(gates_in_kernel, monkeypatch):
    """bigla_chunk and save_states reach BiGLA's entry point (None and True by default)."""
    seen = []
    for name in ("bigla", "bigla_logits", "bigla_packed"):
        real = getattr(gla, name)
        record = lambda *a, real=real, **kw: seen.append(kw) or real(*a, **kw)
        monkeypatch.setattr(gla, name, record)
    x = _normal((1, 4, 4, 16), jnp.float32, 0)
    for kwargs in ({}, dict(bigla_chunk=16, save_states=False)):
        model = _gla("float32", gates_in_kernel=gates_in_kernel, **kwargs)
        jax.make_jaxpr(model.init)(jax.random.key(0), x)
    got = [(kw["chunk_size"], kw["save_states"]) for kw in seen]
    assert got == [(None, True), (16, False)], got


@pytest.mark.parametrize(
    "form", sorted(f for f in GLA_FORMS if "gates_in_kernel" not in f and f != "compact_gates")
)
def test_gla_form_keeps_float32_gates_and_norm_statistics(form, monkeypatch):
    """bf16 compute: BiGLA gets float32 gates, and every rsqrt (norm statistics) is float32
    (compact_gates, whose point is bf16 gates, has its own test)."""
    seen, real_bigla, real_packed = [], gla.bigla, gla.bigla_packed

    def recording_bigla(q, k, v, gf, gb, **kw):
        seen.append((gf.dtype, gb.dtype))
        return real_bigla(q, k, v, gf, gb, **kw)

    def recording_packed(qkv, gates, **kw):
        seen.append((gates.dtype, gates.dtype))
        return real_packed(qkv, gates, **kw)

    x = _normal((1, 4, 4, 16), jnp.bfloat16, 0)
    model = _gla("bfloat16", **GLA_FORMS[form])
    params = model.init(jax.random.key(0), x)
    monkeypatch.setattr(gla, "bigla", recording_bigla)
    monkeypatch.setattr(gla, "bigla_packed", recording_packed)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x))(params)
    assert seen == [(jnp.float32, jnp.float32)]
    rsqrt = [e for e in jaxpr.eqns if e.primitive.name == "rsqrt"]
    rsqrt += [e for e in sub_eqns(jaxpr) if e.primitive.name == "rsqrt"]
    assert rsqrt and {str(e.outvars[0].aval.dtype) for e in rsqrt} == {"float32"}


def test_forms_keep_parameter_tree_and_init():
    """Every form initialises the same tree with the same values: checkpoints and the converter
    are shared."""
    images, rng = _normal((1, 32, 32, 3), jnp.float32, 0), jax.random.key(0)
    for family in TINY:
        want, got = (
            flatten_dict(jax.jit(partial(_tiny(family, **kw).init, train=False))(rng, images))
            for kw in ({}, ALL_FORMS)
        )
        assert got.keys() == want.keys(), family
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{family} {key}")


def _loss_and_grads(model, params, images, train, dropout_seed=3):
    def loss(p):
        logits = model.apply(
            {"params": p}, images, train=train, rngs={"dropout": jax.random.key(dropout_seed)}
        )
        return jnp.mean(jax.nn.log_softmax(logits)[:, 1]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, flatten_dict(grads, sep="/")


def _tiny(family, **kw):
    name, overrides = TINY[family]
    return create_model(name, num_classes=5, bigla_impl="reference", **{**overrides, **kw})


def _init(model, images):
    """The model's params, initialised under jit (op by op, a tiny model's init compiles each op
    and took 2-3x as long)."""
    return jax.jit(partial(model.init, train=False))(jax.random.key(0), images)["params"]


@pytest.mark.parametrize("family", sorted(TINY))
def test_remat_gives_same_loss_and_grads(family):
    """float32, training mode with stochastic depth: remat "block" and "full" keep the rng stream,
    so the loss and every gradient match the stored-activation run to float32 rounding."""
    images = _normal((2, 48, 32, 3), jnp.float32, 0)
    plain = _tiny(family)
    params = _init(plain, images)
    want = _loss_and_grads(plain, params, images, train=True)
    for remat in ("block", "full"):
        model = _tiny(family, remat=remat)
        got = _loss_and_grads(model, params, images, train=True)
        assert_close(f"{family} remat={remat} loss", got[0], want[0], 1e-6)
        for key in want[2]:
            assert_close(f"{family} remat={remat} d{key}", got[2][key], want[2][key], 1e-5)
        # Not vacuous: the rematerialised program has checkpoint regions.
        apply = lambda p, m=model: m.apply({"params": p}, images, train=False)
        text = str(jax.make_jaxpr(apply)(params))
        assert "remat" in text or "checkpoint" in text, remat


@pytest.mark.parametrize("family", sorted(TINY))
def test_scan_blocks_matches_unrolled(family):
    """Logits and gradients of the scanned stack against the unrolled one (eval mode, and training
    mode without stochastic depth, whose masks come from another rng stream when scanned); the
    program holds one scan instead of the repeated blocks."""
    images = _normal((2, 48, 32, 3), jnp.float32, 0)
    for train, remat, kw in ((False, "none", {}), (True, "block", dict(drop_path_rate=0.0))):
        plain = _tiny(family, **kw)
        params = _init(plain, images)
        want = _loss_and_grads(plain, params, images, train)
        model = _tiny(family, scan_blocks=True, remat=remat, **kw)
        got = _loss_and_grads(model, params, images, train)
        tag = f"{family} scan remat={remat} train={train}"
        assert_close(f"{tag} logits", got[1], want[1], 1e-5)
        for key in want[2]:
            assert_close(f"{tag} d{key}", got[2][key], want[2][key], 1e-5)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images, train=False))(params)
    assert [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [3]


def test_scan_blocks_with_stochastic_depth():
    """Training through the scan with stochastic depth: the masks are drawn (the output moves away
    from the eval output) and differ per dropout key; shapes and finiteness as unrolled."""
    images = _normal((8, 32, 32, 3), jnp.float32, 0)
    model = _tiny("vig", scan_blocks=True, drop_path_rate=0.9)
    params = _init(model, images)

    @jax.jit
    def forward(key):
        return model.apply({"params": params}, images, train=True, rngs={"dropout": key})

    evaluated = jax.jit(partial(model.apply, train=False))({"params": params}, images)
    first, second = forward(jax.random.key(1)), forward(jax.random.key(2))
    assert np.isfinite(first).all() and first.shape == evaluated.shape
    assert rel_err(first, evaluated) > 1e-3 and rel_err(first, second) > 1e-3


def test_drop_path_takes_a_traced_rate():
    x = jnp.ones((64, 3))
    rate = jnp.float32(0.25)
    y = jax.jit(
        lambda r: DropPath(r).apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    )(rate)
    assert set(np.unique(np.asarray(y))) <= {0.0, np.float32(1 / 0.75)}
    assert 4 <= (np.asarray(y)[:, 0] == 0).sum() <= 28


GOLDEN_FILES = {  # as tests/test_models.py builds them
    "vig_t_depth2.npz": ("vig_t", dict(depth=2)),
    "vig_h_t_small.npz": (
        "vig_h_t",
        dict(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    ),
}


@pytest.mark.parametrize("projections", ["fused_proj", "split_proj"])
@pytest.mark.parametrize("filename", sorted(GOLDEN_FILES))
def test_golden_parity_with_every_form(filename, projections, x64):
    """float64, official parameters through the converter, every form on: the golden logits to the
    golden.md tolerance, and the sown intermediates still there (block 0 runs outside the scan)."""
    golden = np.load(golden_file(filename))
    name, overrides = GOLDEN_FILES[filename]
    state_dict = {
        k.removeprefix("param/"): golden[k] for k in golden.files if k.startswith("param/")
    }
    model = create_model(
        name,
        num_classes=10,
        dtype=jnp.float64,
        bigla_impl="reference",
        **overrides,
        **{**ALL_FORMS, "fused_proj": False, projections: True},
    )
    params = convert_state_dict(state_dict, model)
    images = jnp.asarray(golden["input0"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    logits, state = jax.jit(
        lambda p, x: model.apply({"params": p}, x, train=False, mutable="intermediates")
    )(params, images)
    want = golden["logits0"]
    scale = np.abs(want).max()
    assert_close(f"{filename} logits", logits, want, 1e-6 * (1 + scale) / scale)
    if "block00" in golden:
        assert_close(
            f"{filename} block0", state["intermediates"]["block0"][0], golden["block00"], 1e-6
        )


def test_vig_embed_barrier_same_numbers_and_load_bearing():
    """embed_barrier (ViG's default) changes no number (float32 logits and gradients against it
    off, to float32 rounding) and is the one optimization barrier in front of the blocks: off,
    the program has none outside the GLA layers' (mix_apart, one per block), the control that
    the check can fail."""
    images = _normal((2, 32, 32, 3), jnp.float32, 0)
    results, barriers = {}, {}
    for on in (True, False):
        model = _tiny("vig", embed_barrier=on)
        params = jax.jit(partial(model.init, train=False))(jax.random.key(0), images)["params"]
        results[on] = _loss_and_grads(model, params, images, train=False)
        jaxpr = jax.make_jaxpr(partial(model.apply, train=False))({"params": params}, images)
        eqns = (*jaxpr.jaxpr.eqns, *sub_eqns(jaxpr.jaxpr))
        barriers[on] = sum(e.primitive.name == "optimization_barrier" for e in eqns)
    depth = TINY["vig"][1]["depth"]
    assert barriers == {True: depth + 1, False: depth}, barriers
    (v1, l1, g1), (v0, l0, g0) = results[True], results[False]
    assert_close("loss", v1, v0, TOL["float32"])
    assert_close("logits", l1, l0, TOL["float32"])
    for key in g0:
        assert_close(f"grad {key}", g1[key], g0[key], TOL["float32"])


def test_bad_forms_raise():
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(
        ValueError, match=r"dwconv impl 'im2col' must be one of \('conv', 'shift'\)"
    ):
        _tiny("vig", dwconv="im2col").init(jax.random.key(0), images, train=False)
    with pytest.raises(
        ValueError, match=r"remat='some' must be one of \('none', 'block', 'full'\)"
    ):
        _tiny("vig_h", remat="some").init(jax.random.key(0), images, train=False)
    with pytest.raises(
        ValueError, match=r"stem impl 'fft' must be one of \('conv', 'patches', 'blocks'\)"
    ):
        _tiny("vig", stem_impl="fft").init(jax.random.key(0), images, train=False)


def test_every_layer_form_is_a_field_of_both_models_and_reaches_the_layer():
    """gla.LAYER_FORMS: the GLA fields ViG and ViG-H pass to every block's layer unchanged."""
    import dataclasses

    from vig_jax.models import model_class
    from vig_jax.models.gla import LAYER_FORMS, GatedLinearAttention

    layer = {f.name for f in dataclasses.fields(GatedLinearAttention)}
    set_by_the_block = {"num_heads", "use_act_in_conv", "use_out_act", "dtype", "parent", "name"}
    for name in ("vig_t", "vig_h_t"):
        fields = {f.name for f in dataclasses.fields(model_class(name))}
        assert fields & layer - set_by_the_block == set(LAYER_FORMS), name
    seen = []
    real = GatedLinearAttention.__call__

    def record(self, x):
        seen.append({f: getattr(self, f) for f in LAYER_FORMS})
        return real(self, x)

    forms = dict(fused_proj=True, dwconv="shift", bigla_chunk=16, save_states=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GatedLinearAttention, "__call__", record)
        for family in sorted(TINY):
            model = _tiny(family, **forms)
            x = jnp.zeros((1, 32, 32, 3))
            jax.eval_shape(lambda m=model, x=x: m.init(jax.random.key(0), x, train=False))
    assert len(seen) > 2 and all(s | forms == s for s in seen), seen
