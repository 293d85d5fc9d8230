"""Device-side augmentations (vig_jax/data/mix.py): normalize, random erasing, mixup/cutmix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close
from vig_jax.data import mix
from vig_jax.train.losses import smooth_labels

B, H, W, C, NUM_CLASSES = 8, 16, 12, 3, 5


# Jitted once per static configuration: eager op-by-op dispatch is several times slower on CPU.
ERASE = jax.jit(mix.random_erasing)
_MIX_TARGETS = jax.jit(
    mix.mixup_cutmix, static_argnames=("mixup_alpha", "cutmix_alpha", "switch_prob")
)


def MIX(key, images, labels, **kwargs):
    """mixup_cutmix on labels smoothed as the train step does (0.1 over NUM_CLASSES)."""
    return _MIX_TARGETS(key, images, _smooth(labels), **kwargs)


def _images():
    return np.random.default_rng(1).standard_normal((B, H, W, C)).astype(np.float32)


def _labels():
    return np.array([0, 1, 2, 3, 4, 0, 1, 2], np.int32)


def _smooth(labels):
    return np.asarray(smooth_labels(jnp.asarray(labels), NUM_CLASSES, 0.1))


def test_normalize_formula_and_dtype():
    images = jax.random.randint(jax.random.key(0), (2, 4, 4, 3), 0, 256).astype(jnp.uint8)
    out = mix.normalize(images, mix.IMAGENET_MEAN, mix.IMAGENET_STD)
    want = (np.asarray(images) / 255.0 - np.array(mix.IMAGENET_MEAN)) / np.array(mix.IMAGENET_STD)
    assert out.dtype == jnp.float32
    assert_close("normalize", out, want, 1e-6)
    assert (
        mix.normalize(images, mix.IMAGENET_MEAN, mix.IMAGENET_STD, jnp.bfloat16).dtype
        == jnp.bfloat16
    )
    with pytest.raises(ValueError, match="per channel"):
        mix.normalize(images, (0.5,), (0.5,))


def test_random_erasing_prob_zero_is_identity():
    images = jnp.zeros((64, H, W, C)) + 7.0
    out = ERASE(jax.random.key(0), images, 0.0)
    np.testing.assert_array_equal(out, images)


def test_random_erasing_changes_only_one_box_per_image():
    images = jnp.zeros((64, H, W, C)) + 7.0  # noise never equals 7 exactly
    out = np.asarray(ERASE(jax.random.key(3), images, 1.0))
    changed = (out != 7.0).any(-1)  # [B, H, W]
    areas = []
    for b in range(out.shape[0]):
        rows, cols = np.nonzero(changed[b])
        assert rows.size, "prob 1 erases every image (boxes this small always fit)"
        box = np.zeros_like(changed[b])
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        np.testing.assert_array_equal(changed[b], box)  # the changed pixels form one rectangle
        assert (out[b][box] != 7.0).all()  # every channel of the box is noise
        areas.append(box.sum() / (H * W))
    # Area fraction in [0.02, 1/3] up to rounding of the sides.
    assert 0.0 < min(areas) and max(areas) < 0.5
    noise = out[changed]
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # standard normal fill


def test_random_erasing_is_deterministic_and_partial_at_half_prob():
    images = jnp.zeros((64, H, W, C)) + 7.0
    a = ERASE(jax.random.key(5), images, 0.5)
    np.testing.assert_array_equal(a, ERASE(jax.random.key(5), images, 0.5))
    erased = int((np.asarray(a) != 7.0).any(axis=(1, 2, 3)).sum())
    assert 16 < erased < 48


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_targets_sum_to_one(mixup_alpha, cutmix_alpha):
    fn = functools.partial(MIX, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=0.5)
    for seed in range(4):
        images, targets = map(np.asarray, fn(jax.random.key(seed), _images(), _labels()))
        assert images.shape == (B, H, W, C) and images.dtype == jnp.float32
        assert targets.shape == (B, NUM_CLASSES) and targets.dtype == jnp.float32
        assert_close("row sums", targets.sum(-1), np.ones(B), 1e-6)
        assert (targets >= 0).all()


def test_mixup_cutmix_alpha_zero_is_identity_with_smoothed_one_hot():
    images, targets = MIX(
        jax.random.key(0), _images(), _labels(), mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5
    )
    np.testing.assert_array_equal(images, _images())
    want = np.full((B, NUM_CLASSES), 0.1 / NUM_CLASSES)
    want[np.arange(B), np.asarray(_labels())] += 0.9
    assert_close("smoothed one-hot", targets, want, 1e-7)


def test_mixup_blends_images_and_targets_with_one_lambda():
    x, y = _images(), _labels()
    images, targets = MIX(
        jax.random.key(2), x, y, mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5
    )
    images, targets = np.asarray(images), np.asarray(targets)
    # Image 0 (label 0) is paired with image 7 (label 2): its target on class 0 reveals lam.
    smooth = _smooth(y)
    lam = float((targets[0, 0] - smooth[7, 0]) / (smooth[0, 0] - smooth[7, 0]))
    assert 0.0 <= lam <= 1.0
    assert_close("mixed images", images, lam * x + (1 - lam) * x[::-1], 1e-5)
    assert_close("mixed targets", targets, lam * smooth + (1 - lam) * smooth[::-1], 1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_one_box_and_lambda_matches_its_area(seed):
    x, y = _images(), _labels()
    images, targets = MIX(
        jax.random.key(seed), x, y, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5
    )
    images, targets = np.asarray(images), np.asarray(targets)
    from_flip = (images == x[::-1]).all(-1)  # [B, H, W]
    from_self = (images == x).all(-1)
    assert (from_flip | from_self).all()
    box = from_flip[0]
    assert (from_flip == box[None]).all()  # the same box for the whole batch
    if box.any():
        rows, cols = np.nonzero(box)
        assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a rectangle
    lam = 1.0 - box.mean()  # corrected by the clipped area
    smooth = _smooth(y)
    assert_close("cutmix targets", targets, lam * smooth + (1 - lam) * smooth[::-1], 1e-5)


def test_mixup_cutmix_switches_between_kinds():
    x = _images()
    kinds = []
    for seed in range(12):
        images, _ = MIX(
            jax.random.key(seed), x, _labels(), mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5
        )
        images = np.asarray(images)
        pixelwise = ((images == x) | (images == x[::-1])).all()
        kinds.append(bool(pixelwise))
    assert 0 < sum(kinds) < 12  # some batches cutmix, some mixup


def test_mixup_cutmix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alphas"):
        MIX(
            jax.random.key(0),
            _images(),
            _labels(),
            mixup_alpha=-1.0,
            cutmix_alpha=1.0,
            switch_prob=0.5,
        )
    with pytest.raises(ValueError, match="labels"):
        MIX(
            jax.random.key(0),
            _images(),
            _labels()[:3],
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
            switch_prob=0.5,
        )
