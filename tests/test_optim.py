"""vig_jax/train/optim.py: lr scaling, warmup + cosine schedule values, weight-decay mask, AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tests.helpers import assert_close
from vig_jax.models import create_model
from vig_jax.train import optim


def _opt(**kw):
    o = common.adamw_section(base_lr=1e-3, weight_decay=0.05, epochs=10.0, warmup_epochs=2.0)
    o.update(kw)
    return o


def test_scaled_lr_is_per_512_images():
    assert optim.scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert optim.scaled_lr(1e-3, 128) == pytest.approx(2.5e-4)


def test_steps_per_epoch_drops_partial_batch():
    assert optim.steps_per_epoch(1_281_167, 1024) == 1251
    with pytest.raises(ValueError, match="batch_size"):
        optim.steps_per_epoch(100, 128)


def test_schedule_values_at_known_steps():
    # 10 epochs x 100 steps, 2 warmup epochs, batch 1024: peak = 1e-3 * 1024 / 512 = 2e-3.
    sched = optim.make_schedule(_opt(), batch_size=1024, steps_per_epoch=100)
    peak, warm_lr, min_lr = 2e-3, 5e-7, 5e-6
    # float32 schedule arithmetic: compare to 1e-6 of the peak.
    tol = 1e-6 * peak
    assert float(sched(0)) == pytest.approx(warm_lr, abs=tol)
    assert float(sched(100)) == pytest.approx(warm_lr + (peak - warm_lr) / 2, abs=tol)
    assert float(sched(200)) == pytest.approx(peak, abs=tol)
    # Half-way through the cosine (step 200 + 400): (peak + min) / 2.
    assert float(sched(600)) == pytest.approx((peak + min_lr) / 2, abs=tol)
    assert float(sched(1000)) == pytest.approx(min_lr, abs=tol)
    # A quarter: min + (peak - min) (1 + cos(pi/4)) / 2.
    want = min_lr + (peak - min_lr) * (1 + np.cos(np.pi / 4)) / 2
    assert float(sched(400)) == pytest.approx(want, abs=tol)


def test_schedule_rejects_warmup_longer_than_run():
    with pytest.raises(ValueError, match="warmup"):
        optim.make_schedule(_opt(warmup_epochs=10.0), batch_size=512, steps_per_epoch=10)


def test_decay_mask_excludes_norms_biases_pos_embed():
    model = create_model("vig_t", num_classes=10, embed_dim=32, depth=1, num_heads=2)
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]
    flat = {
        "/".join(str(k.key) for k in path): (leaf, decays)
        for (path, leaf), decays in zip(
            jax.tree_util.tree_leaves_with_path(params),
            jax.tree_util.tree_leaves(optim.decay_mask(params)),
            strict=True,
        )
    }
    excluded = {name for name, (_, decays) in flat.items() if not decays}
    assert "pos_embed" in excluded and "head/bias" in excluded and "norm/scale" in excluded
    assert any(n.endswith("attn/o_norm/scale") for n in excluded)  # per-head RMSNorm in GLA
    assert any(n.endswith("norm/bias") for n in excluded)  # LayerNorm of the patch embed
    # Decayed: exactly the matrices and conv kernels (rank >= 2) other than the position table.
    for name, (leaf, decays) in flat.items():
        assert decays == (leaf.ndim >= 2 and name != "pos_embed"), name
        if not decays:
            assert name == "pos_embed" or name.endswith(("bias", "scale")), name


def test_optimizer_is_clipped_adamw_with_masked_decay():
    opt = _opt(clip_norm=1.0, weight_decay=0.5)
    lr = 0.1
    tx = optim.make_optimizer(opt, optax.constant_schedule(lr))
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    grads = {"dense": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 4.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Global norm sqrt(4*9 + 2*16) > 1: clipped; Adam's first step is lr * g / (|g| + eps) = lr
    # per element (bias-corrected), whatever the scale; decay adds lr * wd * p on the kernel only.
    # (float32 Adam arithmetic: ~1e-6 relative.)
    assert_close("kernel", updates["dense"]["kernel"], -lr * (1 + 0.5) * np.ones((2, 2)), 1e-5)
    assert_close("bias", updates["dense"]["bias"], -lr * np.ones(2), 1e-5)


def test_optimizer_rejects_bad_clip():
    with pytest.raises(ValueError, match="clip_norm"):
        optim.make_optimizer(_opt(clip_norm=0.0), optax.constant_schedule(0.1))
