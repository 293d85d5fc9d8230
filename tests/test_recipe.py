"""The training recipe against hand-built expectations (issue 21): loss targets, optimizer, augs.

The train step runs on a linear model (logits = flatten(image) @ W + b), whose loss and gradient
are written out here in float64 numpy: normalisation, label smoothing, soft cross-entropy, the
gradient, clipping, AdamW with its decay mask, the warmup/cosine schedule and the EMA are each
computed by hand, so dropping any of them from the step fails a comparison. Mixup/cutmix and
random erasing are rebuilt with `vig_jax.data.mix` (tested on its own in test_data_mix) and the
step's own keys. Also: the step's dropout key and training mode, the drop-path rates over the
blocks, `switch_prob` at 0 and 1, and the DeiT host augmentation (flip rate, RandAugment's rate,
op choice, magnitude and op strengths). Every comparison has a negative control: the expectation
without the element under test differs from the result by far more than the tolerance.
docs/testing.md maps each recipe element to its tests and lists the mutations they catch.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from PIL import Image, ImageEnhance

from configs import common
from tests.helpers import FAST_COMPILE
from vig_jax.data import mix, randaugment, transforms
from vig_jax.models import create_model
from vig_jax.models.layers import DropPath
from vig_jax.train import optim
from vig_jax.train.state import init_state
from vig_jax.train.step import make_train_step

NUM_CLASSES = 5
BATCH = 8
SIZE = 6  # 6x6x3 images: 108 features
STEPS_PER_EPOCH = 2
# Recipe numbers of the test config (see `recipe_config`): 2 epochs of 2 steps, 1 warmup step.
WARMUP_LR, PEAK_LR, MIN_LR, TOTAL_STEPS, WARMUP_STEPS = 0.01, 0.02, 5e-6, 4, 1
WEIGHT_DECAY = 0.5  # large, so that the decay term is ~10% of an update
# float32 step vs float64 by hand: losses and updates agree to ~1e-6 relative.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6  # params ~0.1-1 after steps of ~0.02


class Linear(nn.Module):
    """logits = flatten(images) @ kernel + bias, logits of O(1) (a non-trivial softmax)."""

    @nn.compact
    def __call__(self, images, *, train=False):
        dense = nn.Dense(
            NUM_CLASSES,
            kernel_init=nn.initializers.normal(0.1),
            bias_init=nn.initializers.normal(0.5),  # non-zero: the decay mask must spare it
        )
        return dense(images.reshape(images.shape[0], -1))


class LinearWithDropPath(nn.Module):
    """Linear on features dropped per sample with probability 1/2 (stochastic depth's layer)."""

    @nn.compact
    def __call__(self, images, *, train=False):
        x = DropPath(0.5)(images.reshape(images.shape[0], -1), train=train)
        return nn.Dense(NUM_CLASSES, kernel_init=nn.initializers.normal(0.1))(x)


def recipe_config(
    *, smoothing=0.1, erasing=0.0, mixup=0.0, cutmix=0.0, switch_prob=0.5, clip_norm=5.0, ema=0.0
):
    """The config sections the step reads, with the recipe's builders from configs/common."""
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({"mean": common.IMAGENET_MEAN, "std": common.IMAGENET_STD})
    c.aug = common.deit_aug_section(
        label_smoothing=smoothing, random_erasing=erasing, mixup=mixup, cutmix=cutmix
    )
    c.aug.switch_prob = switch_prob
    # Peak lr = 1.28 * 8 / 512 = 0.02; warmup 0.5 epoch = 1 step from 0.01; 4 steps in all.
    c.optimizer = common.adamw_section(
        base_lr=1.28, weight_decay=WEIGHT_DECAY, epochs=2.0, warmup_epochs=0.5
    )
    c.optimizer.warmup_lr = WARMUP_LR
    c.optimizer.clip_norm = clip_norm
    c.optimizer.ema_decay = ema
    return c


def make_step(config, model=None):
    """(jitted train step, initial state) for `model` (default: Linear) under `config`."""
    schedule = optim.make_schedule(config.optimizer, BATCH, STEPS_PER_EPOCH)
    tx = optim.make_optimizer(config.optimizer, schedule)
    model = model or Linear()
    images = jnp.zeros((BATCH, SIZE, SIZE, 3), jnp.float32)

    def init_params(key):
        return model.init(key, images)["params"]

    state = init_state(
        init_params, tx, jax.random.PRNGKey(4), use_ema=config.optimizer.ema_decay > 0
    )
    step = jax.jit(make_train_step(model, tx, schedule, config, NUM_CLASSES))
    # LLVM -O0 (tests/helpers.FAST_COMPILE): the step is compile-bound on CPU; same numerics.
    return step.lower(state, random_batch()).compile(FAST_COMPILE), state


def fast_jit(fn):
    """jax.jit(fn) compiled at LLVM -O0 on its first call (the Beta sampler of mixup/cutmix
    compiles slowly on CPU); same numerics."""
    compiled = []

    def call(*args):
        if not compiled:
            compiled.append(jax.jit(fn).lower(*args).compile(FAST_COMPILE))
        return compiled[0](*args)

    return call


def random_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
        # Every class present, labels not symmetric under the batch flip mixup pairs with.
        "label": np.array([0, 1, 2, 3, 4, 0, 2, 2], np.int32),
    }


# ---------------------------------------------------------------- hand-built recipe (float64)


def normalise_by_hand(images):
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    return (np.asarray(images, np.float64) / 255.0 - mean) / std


def smooth_by_hand(labels, smoothing):
    """1 - s + s/C on the label, s/C elsewhere."""
    targets = np.full((len(labels), NUM_CLASSES), smoothing / NUM_CLASSES)
    targets[np.arange(len(labels)), labels] += 1.0 - smoothing
    return targets


def loss_and_grads_by_hand(params, images, targets):
    """Mean soft cross-entropy of the linear model and its gradient, float64."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(params["Dense_0"]["bias"], np.float64)
    logits = x @ kernel + bias
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -(targets * logp).sum(axis=1).mean()
    dlogits = (np.exp(logp) - targets) / len(x)  # rows of targets sum to 1
    grads = {"Dense_0": {"kernel": x.T @ dlogits, "bias": dlogits.sum(axis=0)}}
    return loss, grads


def lr_by_hand(step):
    """Linear warmup from WARMUP_LR to PEAK_LR over WARMUP_STEPS, then cosine to MIN_LR."""
    if step < WARMUP_STEPS:
        return WARMUP_LR + (PEAK_LR - WARMUP_LR) * step / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS)
    return MIN_LR + (PEAK_LR - MIN_LR) * 0.5 * (1.0 + np.cos(np.pi * progress))


def global_norm(tree):
    return np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(tree)))


class AdamWByHand:
    """Clip by global norm, then AdamW (b1 0.9, b2 0.999, eps 1e-8) with decay on matrices only."""

    def __init__(self, params, *, clip_norm, decay_mask=True):
        self.clip_norm, self.decay_mask, self.t = clip_norm, decay_mask, 0
        self.m = jax.tree_util.tree_map(np.zeros_like, params)
        self.v = jax.tree_util.tree_map(np.zeros_like, params)

    def step(self, params, grads):
        norm = global_norm(grads)
        if self.clip_norm is not None and norm > self.clip_norm:
            grads = jax.tree_util.tree_map(lambda g: g * self.clip_norm / norm, grads)
        lr = lr_by_hand(self.t)
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, self.m, grads)
        self.v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, self.v, grads)

        def update(p, m, v):
            adam = (m / (1 - b1**self.t)) / (np.sqrt(v / (1 - b2**self.t)) + eps)
            decays = p.ndim > 1 if self.decay_mask else True
            return p - lr * (adam + (WEIGHT_DECAY * p if decays else 0.0))

        return jax.tree_util.tree_map(update, params, self.m, self.v)


def as_float64(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def max_abs_diff(a, b):
    return max(
        float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


# ---------------------------------------------------------------------------- the train step


def test_train_step_loss_is_label_smoothed_cross_entropy_of_normalised_images():
    step, state = make_step(recipe_config(smoothing=0.1))
    batch = random_batch()
    params = as_float64(state.params)
    images = normalise_by_hand(batch["image"])
    want, grads = loss_and_grads_by_hand(params, images, smooth_by_hand(batch["label"], 0.1))
    _, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(want, rel=LOSS_RTOL)
    assert float(metrics["grad_norm"]) == pytest.approx(global_norm(grads), rel=LOSS_RTOL)
    assert float(metrics["lr"]) == pytest.approx(WARMUP_LR, rel=1e-6)
    # Negative controls: without smoothing, or on raw 0-255 pixels, the loss is far off.
    unsmoothed, _ = loss_and_grads_by_hand(params, images, smooth_by_hand(batch["label"], 0.0))
    raw, _ = loss_and_grads_by_hand(
        params, batch["image"] / 255.0, smooth_by_hand(batch["label"], 0.1)
    )
    for other in (unsmoothed, raw):
        assert abs(other - want) > 100 * LOSS_RTOL * want


def test_train_step_applies_the_model_in_training_mode_with_the_steps_dropout_key():
    # Stochastic depth happens in the model; the step must call it with train=True and the
    # dropout key split from fold_in(key, step) (micro-batch 0 of 1: fold_in(drop_key, 0)).
    model = LinearWithDropPath()
    step, state = make_step(recipe_config(smoothing=0.0), model)
    batch = random_batch(seed=3)
    images = jnp.asarray(normalise_by_hand(batch["image"]), jnp.float32)
    targets = smooth_by_hand(batch["label"], 0.0)

    def loss(key, train):
        rngs = {"dropout": key} if train else {}
        logits = model.apply({"params": state.params}, images, train=train, rngs=rngs)
        logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
        return -(targets * logp).sum(axis=1).mean()

    for t in range(2):
        drop_key = jax.random.split(jax.random.fold_in(state.key, t), 3)[2]
        want = loss(jax.random.fold_in(drop_key, 0), train=True)
        # Negative control: without dropping, the loss is far off.
        assert abs(loss(None, train=False) - want) > 100 * LOSS_RTOL * want
        params = state.params
        state, metrics = step(state, batch)
        assert float(metrics["loss"]) == pytest.approx(want, rel=LOSS_RTOL), f"step {t}"
        state = state.replace(params=params)  # same params: only the key changes


@pytest.mark.parametrize(
    "name, overrides, want",
    [
        # One DropPath per block (after GLA and after the MLP); rates linear from 0 over blocks.
        ("vig_t", dict(embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.2), [0, 0.1, 0.2]),
        (
            "vig_h_t",
            dict(dims=(16, 32), depths=(1, 2), num_heads=(1, 2), drop_path_rate=0.3),
            [0, 0.15, 0.3],
        ),
    ],
    ids=["vig", "vig_h"],
)
def test_drop_path_rates_rise_linearly_over_the_blocks(name, overrides, want):
    model = create_model(name, num_classes=NUM_CLASSES, bigla_impl="reference", **overrides)
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, DropPath):
            rates[context.module.scope.path] = context.module.rate
        return next_fun(*args, **kwargs)

    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda p: model.apply(p, images, train=True, rngs={"dropout": jax.random.key(0)}),
            params,
        )
    np.testing.assert_allclose([rates[k] for k in sorted(rates)], want, atol=1e-12)


@pytest.mark.parametrize(
    "mixup, cutmix, switch_prob, erasing",
    [(0.8, 0.0, 1.0, 0.0), (0.8, 1.0, 1.0, 0.0), (0.8, 1.0, 0.5, 0.25)],
    ids=["mixup_only", "cutmix_by_switch_prob", "recipe"],
)
def test_train_steps_loss_uses_mixed_smoothed_targets_with_the_steps_keys(
    mixup, cutmix, switch_prob, erasing
):
    # The recipe's order: normalise -> erase -> smooth -> mix; step t splits its erase and mix
    # keys from fold_in(key, t). Two steps, so a step reusing one key for every step fails too.
    config = recipe_config(
        smoothing=0.1, erasing=erasing, mixup=mixup, cutmix=cutmix, switch_prob=switch_prob
    )
    step, state = make_step(config)
    batch = random_batch(seed=1)
    plain = jnp.asarray(normalise_by_hand(batch["image"]), jnp.float32)
    smoothed = jnp.asarray(smooth_by_hand(batch["label"], 0.1), jnp.float32)
    erase = fast_jit(lambda k, x: mix.random_erasing(k, x, erasing))
    mixes = fast_jit(
        lambda k, x, t: mix.mixup_cutmix(
            k, x, t, mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch_prob
        )
    )
    hand = AdamWByHand(as_float64(state.params), clip_norm=5.0)
    params, erased = as_float64(state.params), False
    for t in range(2):
        erase_key, mix_key, _ = jax.random.split(jax.random.fold_in(state.key, t), 3)
        images = erase(erase_key, plain) if erasing else plain
        erased |= not np.array_equal(images, plain)
        images, targets = mixes(mix_key, images, smoothed)
        want, grads = loss_and_grads_by_hand(params, images, np.asarray(targets, np.float64))
        state, metrics = step(state, batch)
        assert float(metrics["loss"]) == pytest.approx(want, rel=LOSS_RTOL), f"step {t}"
        # Negative control: the loss of the unmixed (and unerased) batch is far off.
        unmixed, _ = loss_and_grads_by_hand(params, plain, np.asarray(smoothed, np.float64))
        assert abs(unmixed - want) > 100 * LOSS_RTOL * want, f"step {t}"
        params = hand.step(params, grads)
    assert erased or not erasing, "premise: these keys erase some image"


def test_two_train_steps_equal_clipped_adamw_with_decay_mask_schedule_and_ema_by_hand():
    batch = random_batch(seed=2)
    images = normalise_by_hand(batch["image"])
    targets = smooth_by_hand(batch["label"], 0.1)
    # Clip at a quarter of the first gradient's norm: step 1 is clipped; Adam's second update
    # depends on the ratio of the two (clipped) gradients, so it sees the clipping.
    _, state0 = make_step(recipe_config())
    params0 = as_float64(state0.params)
    _, grads0 = loss_and_grads_by_hand(params0, images, targets)
    clip_norm = 0.25 * global_norm(grads0)
    ema_decay = 0.75  # not 1/2: a swapped decay and step size would go unseen
    step, state = make_step(recipe_config(clip_norm=float(clip_norm), ema=ema_decay))

    def by_hand(**adamw):
        opt = AdamWByHand(params0, **adamw)
        params, ema, lrs = params0, params0, []
        for t in range(2):
            _, grads = loss_and_grads_by_hand(params, images, targets)
            params = opt.step(params, grads)
            ema = jax.tree_util.tree_map(
                lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params
            )
            lrs.append(lr_by_hand(t))
        return params, ema, lrs

    want, want_ema, want_lrs = by_hand(clip_norm=clip_norm)
    for want_lr in want_lrs:
        state, metrics = step(state, batch)
        assert float(metrics["lr"]) == pytest.approx(want_lr, rel=1e-6)
    assert int(state.step) == 2
    assert max_abs_diff(state.params, want) < PARAM_ATOL
    assert max_abs_diff(state.ema, want_ema) < PARAM_ATOL
    # Negative controls: no clipping, decay on every param, or a constant peak lr would each
    # move the params by far more than the tolerance.
    assert max_abs_diff(by_hand(clip_norm=None)[0], want) > 100 * PARAM_ATOL
    assert max_abs_diff(by_hand(clip_norm=clip_norm, decay_mask=False)[0], want) > 100 * PARAM_ATOL
    assert abs(want_lrs[1] - want_lrs[0]) > 0.1 * PEAK_LR


@pytest.mark.parametrize("norm", [10.0, 2.0], ids=["clipped", "below_clip_norm"])
def test_optimizer_clips_global_norm_to_clip_norm_before_adam(norm):
    # The recipe's clip_norm 5 on a gradient of global norm 10 (halved) or 2 (untouched). Two
    # steps: the first gradient scaled by `norm`, the second a fixed one of norm 1; Adam's second
    # update depends on their ratio, so it sees what the clip stage passed on.
    opt = recipe_config().optimizer
    assert opt.clip_norm == 5.0
    tx = optim.make_optimizer(opt, optim.make_schedule(opt, BATCH, STEPS_PER_EPOCH))
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    directions = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(2)]
    grads = [
        {k: g * size / global_norm(d) for k, g in d.items()}
        for d, size in zip(directions, (norm, 1.0), strict=True)
    ]
    got = jax.tree_util.tree_map(jnp.float32, params)
    opt_state = tx.init(got)
    update = jax.jit(tx.update)
    for g in grads:
        updates, opt_state = update(jax.tree_util.tree_map(jnp.float32, g), opt_state, got)
        got = optax.apply_updates(got, updates)
    hand = AdamWByHand(params, clip_norm=5.0)
    want = params
    for g in grads:
        want = hand.step(want, g)
    assert max_abs_diff(got, want) < PARAM_ATOL
    # Negative control (clipped case): without the clip stage the second update differs.
    unclipped = AdamWByHand(params, clip_norm=None)
    other = params
    for g in grads:
        other = unclipped.step(other, g)
    if norm > 5.0:
        assert max_abs_diff(other, want) > 100 * PARAM_ATOL


# ------------------------------------------------------------------------------ mixup/cutmix


def _mix_batch(seed):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    targets = jnp.eye(4, dtype=jnp.float32)  # image i has class i; its flip partner is 3 - i
    return images, targets


@pytest.mark.parametrize("switch_prob", [0.0, 1.0], ids=["mixup_only", "cutmix_only"])
def test_switch_prob_is_the_probability_of_cutmix(switch_prob):
    images, targets = _mix_batch(0)
    flipped = np.asarray(images[::-1])
    mix_fn = jax.jit(
        lambda key: mix.mixup_cutmix(
            key, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob
        )
    )
    for seed in range(8):
        out, out_targets = mix_fn(jax.random.PRNGKey(seed))
        out, lam = np.asarray(out), float(out_targets[0, 0])  # image 0 keeps a fraction lam
        from_image = out == np.asarray(images)
        from_flip = out == flipped
        if switch_prob == 1.0:  # cutmix: every pixel is copied from one of the two images
            assert (from_image | from_flip).all(), f"seed {seed}: blended pixels under cutmix"
            kept = from_image.all(axis=-1).mean(axis=(1, 2))  # per image
            np.testing.assert_allclose(kept, lam, atol=1e-6)
        else:  # mixup: a blend with lam strictly inside (0, 1), matching the targets
            assert 0.0 < lam < 1.0
            assert not (from_image | from_flip).all(), f"seed {seed}: a pure copy under mixup"
            np.testing.assert_allclose(
                out, lam * np.asarray(images) + (1 - lam) * flipped, rtol=1e-5, atol=1e-6
            )


# ------------------------------------------------------------------------------- RandAugment


class _FixedRng:
    """Stands in for np.random.Generator in the ops: random() -> 0.9 picks the positive sign."""

    def random(self):
        return 0.9


def test_randaugment_is_applied_by_the_deit_transform_at_its_rate_and_magnitude(monkeypatch):
    # The recipe's "rand-m9-mstd0.5-inc1": per image 2 ops drawn uniformly from 15, each applied
    # with probability 1/2, at a level ~ N(9, 0.5). The ops are replaced by recorders.
    calls = []

    def recorder(index):
        def op(img, level, rng):
            calls[-1].append((index, level))
            return img

        return op

    monkeypatch.setattr(randaugment, "OPS", tuple(recorder(i) for i in range(15)))
    transform = transforms.TrainTransform.from_config(common.deit_host_augment(), image_size=16)
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    n = 2000
    for seed in range(n):
        calls.append([])
        transform({"image": image, "label": 0}, np.random.default_rng(seed))
    per_image = np.array([len(c) for c in calls])
    # Binomial(2, 1/2) ops per image: 1/4 none, 1/2 one, 1/4 two (sd of each fraction ~0.01).
    np.testing.assert_allclose(
        [np.mean(per_image == k) for k in (0, 1, 2)], [0.25, 0.5, 0.25], atol=0.04
    )
    levels = np.array([level for c in calls for _, level in c])
    assert levels.mean() == pytest.approx(9.0, abs=0.05)  # sd of the mean ~0.011
    assert levels.std() == pytest.approx(0.5, abs=0.05)
    assert levels.min() >= 0.0 and levels.max() <= 10.0
    counts = np.bincount([i for c in calls for i, _ in c], minlength=15)
    # Uniform over the 15 ops: ~133 each, sd ~11.
    assert counts.min() > 80 and counts.max() < 190, counts


def test_randaugment_op_strengths_at_full_magnitude():
    # Level 10 is each op's maximum: rotate 30 degrees, shear 0.3, translate 45% of the size,
    # enhance factor 1 + 0.9, solarize threshold 0 (everything inverted), posterize 0 bits.
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    fill = (124, 116, 104)
    bicubic = Image.Resampling.BICUBIC

    def affine(coefficients):
        return np.asarray(
            img.transform(img.size, Image.Transform.AFFINE, coefficients, bicubic, fillcolor=fill)
        )

    want = {
        "_rotate": np.asarray(img.rotate(30.0, resample=bicubic, fillcolor=fill)),
        "_shear_x": affine((1, 0.3, 0, 0, 1, 0)),
        "_shear_y": affine((1, 0, 0, 0.3, 1, 0)),
        "_translate_x": affine((1, 0, 0.45 * 24, 0, 1, 0)),
        "_translate_y": affine((1, 0, 0, 0, 1, 0.45 * 20)),
        "_solarize": 255 - arr,
        "_posterize": np.zeros_like(arr),
        "_solarize_add": np.where(arr < 128, np.minimum(arr.astype(int) + 110, 255), arr),
        "_brightness": np.asarray(ImageEnhance.Brightness(img).enhance(1.9)),
        "_contrast": np.asarray(ImageEnhance.Contrast(img).enhance(1.9)),
    }
    ops = {op.__name__: op for op in randaugment.OPS}
    for name, expected in want.items():
        got = np.asarray(ops[name](img, 10.0, _FixedRng()))
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # Half magnitude: rotate 15 degrees, posterize keeps 2 bits, solarize at threshold 128.
    np.testing.assert_array_equal(
        np.asarray(ops["_rotate"](img, 5.0, _FixedRng())),
        np.asarray(img.rotate(15.0, resample=bicubic, fillcolor=fill)),
    )
    np.testing.assert_array_equal(np.asarray(ops["_posterize"](img, 5.0, None)), arr & 0xC0)
    np.testing.assert_array_equal(
        np.asarray(ops["_solarize"](img, 5.0, None)), np.where(arr >= 128, 255 - arr, arr)
    )


def test_deit_transform_flips_half_the_images():
    # The recipe's host augmentation with the crop pinned to the whole (square) image and
    # RandAugment off: each output is the image or its mirror, mirrored with probability 1/2.
    augment = common.deit_host_augment()
    augment.update(scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment=None)
    transform = transforms.TrainTransform.from_config(augment, image_size=16)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    flips = 0
    for seed in range(400):
        out = transform({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
        flipped = np.array_equal(out, image[:, ::-1])
        assert flipped or np.array_equal(out, image), f"seed {seed}: neither image nor mirror"
        flips += flipped
    assert 160 <= flips <= 240  # Binomial(400, 1/2): 200 +- 10
