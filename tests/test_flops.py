"""FLOP counter: hand counts of a small DeiT, loop-aware matmul count, depthwise conv, the CLI."""

import jax
import jax.numpy as jnp
import pytest

from vig_jax import flops
from vig_jax.models.deit import DeiT


def _deit_matmul_flops(d, depth, grid_hw, classes, patch=16, mlp_ratio=4):
    """Hand count, 2 FLOPs per multiply-add: patch conv, per block qkv / scores / attn·v / proj /
    fc1 / fc2, head. T = 1 + h·w tokens; attention over all heads costs 2·T·T·D twice."""
    n = grid_hw[0] * grid_hw[1]
    t = n + 1
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * mlp_ratio * d
    return 2 * n * patch * patch * 3 * d + depth * block + 2 * d * classes


def test_flops_small_deit_matches_hand_count():
    # Learned grid = token grid, so no position-table resize adds matmuls.
    model = DeiT(num_classes=10, embed_dim=384, depth=2, num_heads=6, pos_embed_grid=(4, 6))
    count = flops.count_module(model, (64, 96))
    want = _deit_matmul_flops(384, 2, (4, 6), 10)
    assert count.matmul_flops == want
    # XLA also counts elementwise ops (LayerNorm, GELU, softmax, residual adds) at 1 FLOP per
    # element: a few % on top of the matmuls at this width, never less than them.
    assert 1.0 <= count.xla_flops / want <= 1.04, count.xla_flops / want
    assert count.macs == count.xla_flops / 2
    assert count.opaque == () and count.xla_loops == 0


def test_matmul_flops_multiplies_scan_bodies_xla_does_not():
    n, steps = 32, 10

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=steps)[0]

    x = jax.ShapeDtypeStruct((n, n), jnp.float32)
    traced = jax.jit(f).trace(x, x)
    got, opaque = flops.matmul_flops(traced.jaxpr.jaxpr)
    assert got == steps * 2 * n**3 and opaque == set()
    # The blind spot the module docstring warns about: XLA counts the loop body once.
    assert traced.lower().compile().cost_analysis()["flops"] < 2 * 2 * n**3


def test_matmul_flops_depthwise_conv_and_while():
    x = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 1, 16), jnp.float32)

    def f(x, k):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=16
        )
        return jax.lax.while_loop(lambda c: c[0, 0, 0, 0] < 0, lambda c: c @ jnp.eye(16), y)

    got, opaque = flops.matmul_flops(jax.make_jaxpr(f)(x, kernel).jaxpr)
    assert got == 2 * (2 * 8 * 8 * 16) * 9 and opaque == {"while"}


def test_flops_cli_registered_models_non_square(capsys):
    flops.main(["deit_t", "--size", "224", "320"])
    out = capsys.readouterr().out
    assert "deit_t @ 224x320" in out and "5,717,416" in out
    matmul_g = float(out.split("matmul FLOPs")[1].split()[0])
    # 14x20 grid; the 14x14 -> 14x20 position-table resize adds ~0.1 MFLOPs.
    assert matmul_g == pytest.approx(_deit_matmul_flops(192, 12, (14, 20), 1000) / 1e9, rel=1e-3)
    # 160x128 -> 10x8 grid = 80 tokens = 2 chunks of the chunked BiGLA: a real scan in each block.
    flops.main(["vig_t", "--size", "160", "128"])
    out = capsys.readouterr().out
    assert "5,834,536" in out and "12 while loop(s)" in out


def test_flops_cli_rejects_bad_size_and_name():
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        flops.main(["deit_t", "--size", "1", "2", "3"])
    with pytest.raises(ValueError, match="deit_t"):
        flops.count_model("deit_tt", (224, 224))
