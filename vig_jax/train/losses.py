"""Loss and metrics of the recipe: label-smoothed soft-target cross-entropy, top-k accuracy."""

import jax
import jax.numpy as jnp


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing, as timm: `1 - s + s/C` on the label, `s/C` elsewhere.

    Args:
      labels: int [B] class ids.
      num_classes: C.
      smoothing: s in [0, 1).

    Returns:
      float32 [B, C] rows summing to 1.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against soft targets, computed in float32.

    Args:
      logits: [B, C], any float dtype.
      targets: [B, C] probabilities (mixup/cutmix and/or label smoothing).

    Returns:
      float32 [B].
    """
    if logits.shape != targets.shape:
        raise ValueError(f"{logits.shape=} must equal {targets.shape=}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where `labels` is among the `k` largest logits, else 0.0.

    Ties count against the label: a class scoring equal to the label's counts as ranked above it,
    so constant logits (e.g. a dead model) score 0, never 100%.

    Args:
      logits: [B, C]; labels: int [B]; k: 1 <= k <= C.

    Returns:
      float32 [B].
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"need 1 <= k <= C, got {k=} for {logits.shape=}")
    logits = logits.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)  # [B, 1]
    # Rank of the label = number of classes scoring at least as high, itself excluded.
    higher = jnp.sum(logits >= label_logit, axis=-1) - 1  # [B]
    return (higher < k).astype(jnp.float32)
