"""vig_jax/train/losses.py: label-smoothed soft-target cross-entropy and top-k, by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from vig_jax.train.losses import smooth_labels, soft_cross_entropy, topk_correct


def test_smooth_labels_values():
    got = smooth_labels(jnp.array([2, 0]), num_classes=4, smoothing=0.1)
    want = np.full((2, 4), 0.025)
    want[0, 2] = want[1, 0] = 0.925
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_label_smoothed_cross_entropy_by_hand():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    targets = smooth_labels(jnp.array([0, 1]), num_classes=3, smoothing=0.1)
    # log-softmax by hand; target 0.1/3 off the label, 0.9 + 0.1/3 on it.
    lse0 = np.log(np.exp(2.0) + np.exp(1.0) + 1.0)
    lse1 = np.log(2.0 + np.exp(3.0))
    on, off = 0.9 + 0.1 / 3, 0.1 / 3
    want0 = -(on * (2.0 - lse0) + off * (1.0 - lse0) + off * (0.0 - lse0))
    want1 = -(off * (0.0 - lse1) + on * (0.0 - lse1) + off * (3.0 - lse1))
    got = soft_cross_entropy(logits, targets)
    np.testing.assert_allclose(got, [want0, want1], rtol=1e-6)
    # bf16 logits are upcast: the loss is float32.
    assert soft_cross_entropy(logits.astype(jnp.bfloat16), targets).dtype == jnp.float32


def test_soft_cross_entropy_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must equal"):
        soft_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_smooth_labels_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="smoothing"):
        smooth_labels(jnp.array([0]), 3, 1.0)


def test_topk_correct_and_ties():
    logits = jnp.array([[0.1, 0.5, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    labels = jnp.array([1, 2, 3])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [0, 0, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 2), [1, 0, 0])
    # Ties count against the label: constant logits are never "correct" below k = C.
    np.testing.assert_array_equal(topk_correct(logits, labels, 3), [1, 0, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 4), [1, 1, 1])
    with pytest.raises(ValueError, match="k"):
        topk_correct(logits, labels, 5)
