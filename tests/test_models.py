"""ViG / ViG-H: golden parity with the official models, sizes, BiGLA impls, gradients, registry."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from pallas_kernels.bigla import bigla
from tests.conftest import golden_file
from tests.helpers import assert_close, patch_bigla, rel_err
from vig_jax import models
from vig_jax.convert import convert_state_dict
from vig_jax.models import create_model, list_models
from vig_jax.models.layers import DropPath

# Golden models: 10 classes, reduced depth (spec/golden.md); built from the registry with overrides.
GOLDEN = {
    "vig_t_depth2.npz": ("vig_t", dict(depth=2)),
    "vig_s_depth1.npz": ("vig_s", dict(depth=1)),
    "vig_h_t_small.npz": (
        "vig_h_t",
        dict(dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    ),
}
OFFICIAL_NAMES = {
    "vig_t": "ViG-T",
    "vig_s": "ViG-S",
    "vig_b": "ViG-B",
    "vig_h_t": "ViG-H-T",
    "vig_h_s": "ViG-H-S",
    "vig_h_b": "ViG-H-B",
}
TINY = {  # fast models for the tests that need no golden file; K = 16, V = 32 (pallas sizes)
    "vig": ("vig_t", dict(embed_dim=64, depth=2, num_heads=2, drop_path_rate=0.1)),
    # Two stages instead of four: half the compile time, same code paths (blocks, downsample, head).
    "vig_h": ("vig_h_t", dict(dims=(32, 64), depths=(1, 1), num_heads=(1, 2), drop_path_rate=0.1)),
}


def _init(model, images):
    return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)["params"]


def _apply(model, params, images):
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False, mutable="intermediates"))
    return fn(params, images)


def _golden_errors(filename, dtype):
    """(name, relative error, tolerance) of the logits and intermediates of every golden input,
    official params loaded through the converter."""
    golden = np.load(golden_file(filename))
    name, overrides = GOLDEN[filename]
    state_dict = {
        k.removeprefix("param/"): golden[k] for k in golden.files if k.startswith("param/")
    }
    model = create_model(
        name, num_classes=10, dtype=jnp.dtype(dtype), bigla_impl="reference", **overrides
    )
    params = convert_state_dict(state_dict, model)
    errors = []
    for i in (0, 1):
        images = jnp.asarray(golden[f"input{i}"].transpose(0, 2, 3, 1), dtype)  # NCHW -> NHWC
        logits, state = _apply(model, params, images)
        for key, got in [("logits", logits)] + [
            (k, state["intermediates"][k][0])
            for k in ("patch_embed", "block0")
            if f"{k}{i}" in golden
        ]:
            want = golden[f"{key}{i}"]
            scale = np.abs(want).max()
            # golden.md: float64 max|d| <= 1e-6 (1 + max|want|); float32 <= 1e-4 max|want|.
            tol = 1e-6 * (1 + scale) / scale if dtype == "float64" else 1e-4
            errors.append((f"{filename} {key}{i} {dtype}", got, want, tol))
    return errors


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("filename", sorted(GOLDEN))
def test_golden_parity(filename, dtype, request):
    """Official params through the converter; logits and intermediates of every golden input."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    for name, got, want, tol in _golden_errors(filename, dtype):
        assert_close(name, got, want, tol)


def _zero_bigla(q, k, v, gf, gb, **kw):
    return jnp.zeros(v.shape, q.dtype)


def _swapped_gates_bigla(q, k, v, gf, gb, **kw):
    return bigla(q, k, v, gb, gf, **kw)


def _sum_of_directions_bigla(q, k, v, gf, gb, **kw):
    return 2 * bigla(q, k, v, gf, gb, **kw)


@pytest.mark.parametrize(
    "broken, min_err",
    # Measured on the golden files (float64): zeroed ~0.5, swapped gates ~0.07 (golden.md).
    [(_zero_bigla, 1e-2), (_swapped_gates_bigla, 1e-3)],
    ids=["bigla_zeroed", "gates_swapped"],
)
@pytest.mark.parametrize("filename", sorted(GOLDEN))
def test_golden_parity_fails_when_bigla_is_broken(filename, broken, min_err, monkeypatch, x64):
    """Negative control: the golden files tell a model with a broken BiGLA from the official one,
    by far more than the parity tolerance (the unit-scale parameters make the branch matter)."""
    patch_bigla(monkeypatch, broken)
    errors = [
        (name, rel_err(got, want), tol)
        for name, got, want, tol in _golden_errors(filename, "float64")
        if "logits" in name
    ]
    worst = max(err for _, err, _ in errors)
    assert worst > min_err, f"{broken.__name__}: logits still match the official ones ({errors})"


def test_golden_vig_h_eval_path_equals_training_path_up_to_norm_eps(x64):
    """ViG-H's official eval path sums the two directions, its training path takes their mean.
    The RMSNorm right after BiGLA cancels that factor 2 up to its eps, so both official logits agree
    to well inside the float64 tolerance, and our mean-of-directions model (and the same model
    with the sum) matches the eval-path logits as well as the training-path ones."""
    golden = np.load(golden_file("vig_h_t_small.npz"))
    for i in (0, 1):
        want = golden[f"logits{i}"]
        tol = 1e-6 * (1 + np.abs(want).max()) / np.abs(want).max()
        assert rel_err(golden[f"logits_eval{i}"], want) < tol / 10
    calls = []  # the sum must be what ran
    with pytest.MonkeyPatch.context() as patch:
        patch_bigla(patch, lambda *a, **kw: calls.append(1) or _sum_of_directions_bigla(*a, **kw))
        summed = _golden_errors("vig_h_t_small.npz", "float64")
    assert calls
    for name, got, _, tol in summed:
        i = name.split(" ")[1][-1]
        assert_close(name + " (sum of directions)", got, golden[f"logits_eval{i}"], tol)


@pytest.mark.parametrize("name", sorted(OFFICIAL_NAMES))
def test_param_count_matches_official(name):
    counts = json.loads(golden_file("param_counts.json").read_text())
    model = create_model(name, bigla_impl="reference")
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == counts[OFFICIAL_NAMES[name]]


def _tiny(family, **kwargs):
    name, overrides = TINY[family]
    return create_model(name, num_classes=5, **{**overrides, **kwargs})


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize(
    "family, impl",
    [("vig", "chunked"), ("vig_h", "chunked"), ("vig", "pallas")],  # pallas interpret is slow
)
def test_bigla_impls_give_reference_logits(family, impl):
    # Non-square; ViG grid 6x10 (N = 60, one padded chunk of 64); ViG-H stage grids 12x20 (N = 240,
    # several chunks) and 6x10. Jitted, as in training: the eager path can hide compiler issues.
    images = _images((2, 96, 160, 3) if family == "vig" else (2, 48, 80, 3))
    ref = _tiny(family, bigla_impl="reference")
    params = _init(ref, images)
    want, _ = _apply(ref, params, images)
    model = _tiny(family, bigla_impl=impl, bigla_interpret=impl == "pallas")
    got, _ = _apply(model, params, images)
    assert_close(f"{family} {impl} logits", got, want, 1e-4)


@pytest.mark.parametrize("family", ["vig", "vig_h"])
def test_grads_finite_jit_nonsquare(family):
    """value_and_grad of a jitted training step with stochastic depth on a non-square batch."""
    model = _tiny(family, bigla_impl="reference")
    images = _images((2, 64, 48, 3))
    labels = jnp.array([1, 3])
    params = _init(model, images)

    @jax.jit
    def loss_fn(params, images, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    loss, grads = jax.value_and_grad(loss_fn)(params, images, jax.random.key(2))
    assert np.isfinite(loss)
    flat = flatten_dict(grads, sep="/")
    for path, g in flat.items():
        assert np.isfinite(g).all(), f"non-finite gradient at {path}"
    zero = [p for p, g in flat.items() if not np.any(g)]
    assert not zero, f"parameters with all-zero gradients: {zero}"


def test_features_shapes():
    images = _images((2, 96, 64, 3))
    vig = _tiny("vig", bigla_impl="reference", depth=1)
    params = _init(vig, images)
    tokens = jax.jit(lambda p, x: vig.apply({"params": p}, x, method=vig.features))(params, images)
    assert tokens.shape == (2, 6, 4, 64)  # h = (96 - 7) // 8 + 1 = 12 -> 6
    logits, _ = _apply(vig, params, images)
    head = tokens.mean((1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]
    assert_close("head(mean(features))", head, logits, 1e-5)

    vig_h = create_model("vig_h_t", bigla_impl="reference")
    variables = jax.eval_shape(lambda x: vig_h.init(jax.random.key(0), x, train=False), images)
    maps = jax.eval_shape(lambda v, x: vig_h.apply(v, x, method=vig_h.features), variables, images)
    want = [(2, 24, 16, 96), (2, 12, 8, 192), (2, 6, 4, 384), (2, 3, 2, 768)]
    assert [m.shape for m in maps] == want


def test_bf16_compute_keeps_float32_params_and_logits():
    images = _images((1, 32, 32, 3))
    ref = _tiny("vig", bigla_impl="reference")
    params = _init(ref, images)
    model = _tiny("vig", bigla_impl="reference", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(_init(model, images))} == {jnp.dtype(jnp.float32)}
    want, _ = _apply(ref, params, images)
    got, _ = _apply(model, params, images)
    assert got.dtype == jnp.float32
    assert_close("bf16 logits", got, want, 5e-2)


def test_init_follows_official_scheme():
    """Plain ViG: GLA weights xavier_uniform(gain 2^-2.5), other Linears normal(0.02); ViG-H: only
    the depthwise conv keeps xavier, every Linear trunc_normal(0.02); norms 1 / 0."""
    images = _images((1, 32, 32, 3))
    vig = create_model("vig_s", depth=1, bigla_impl="reference")
    p = flatten_dict(_init(vig, images), sep="/")
    xavier_std = lambda fan_in, fan_out: 2**-2.5 * np.sqrt(2 / (fan_in + fan_out))
    assert np.std(p["blocks_0/attn/qkv/kernel"]) == pytest.approx(xavier_std(384, 768), rel=0.05)
    assert np.std(p["blocks_0/attn/dwconv/kernel"]) == pytest.approx(
        xavier_std(9, 9 * 384), rel=0.1
    )
    assert np.std(p["blocks_0/mlp/up/kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.abs(p["blocks_0/attn/gate_up/bias"]).max() == 0
    assert np.std(p["pos_embed"]) == pytest.approx(0.02, rel=0.05)
    assert (p["blocks_0/attn/o_norm/scale"] == 1).all()

    vig_h = create_model("vig_h_t", depths=(1, 1, 1, 1), bigla_impl="reference")
    p = flatten_dict(_init(vig_h, images), sep="/")
    assert np.std(p["stages_2_0/attn/qkv/kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["stages_2_0/attn/dwconv/kernel"]) == pytest.approx(
        xavier_std(9, 9 * 384), rel=0.1
    )
    assert (p["stages_2_0/attn_norm/scale"] == 1).all() and (
        p["stages_2_0/attn_norm/bias"] == 0
    ).all()


def test_drop_path_drops_whole_samples():
    x = jnp.ones((64, 3, 2, 4))
    layer = DropPath(0.25)
    y = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    per_sample = np.unique(np.asarray(y).reshape(64, -1), axis=1)  # one value per sample
    assert per_sample.shape == (64, 1)
    assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
    assert 4 <= (per_sample == 0).sum() <= 28  # ~16 of 64 dropped
    assert (layer.apply({}, x, train=False) == x).all()


def test_registry_lists_and_rejects():
    assert {"vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b"} <= set(list_models())
    assert list_models("vig_h_*") == ["vig_h_b", "vig_h_s", "vig_h_t"]
    with pytest.raises(ValueError, match="did you mean 'vig_s'.*vig_h_t"):
        create_model("vig_S")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['deph'\]"):
        create_model("vig_t", deph=3)
    with pytest.raises(ValueError, match="unknown override"):
        create_model("vig_h_t", depth=3)  # plain-ViG field on ViG-H
    model = create_model("vig_t", num_classes=7, bigla_impl="chunked", depth=3)
    assert (model.num_classes, model.bigla_impl, model.depth, model.embed_dim) == (
        7,
        "chunked",
        3,
        192,
    )


def test_registry_bigla_impl_only_for_bigla_models(monkeypatch):
    import flax.linen as nn

    class NoBiGLA(nn.Module):
        num_classes: int
        dtype: jnp.dtype = jnp.float32

    monkeypatch.setitem(models.VARIANTS, "plain_net", (NoBiGLA, {}))
    assert create_model("plain_net", num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="has no BiGLA layer"):
        create_model("plain_net", bigla_impl="pallas")


def test_bad_shapes_raise():
    for family in TINY:
        with pytest.raises(ValueError, match="NHWC"):
            _tiny(family).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)), train=False)
    with pytest.raises(ValueError, match="divisible by 2 \\* num_heads"):
        _tiny("vig", bigla_impl="reference", num_heads=3).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
        )
