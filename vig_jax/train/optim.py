"""Optimizer and schedule of the training recipe (docs/training.md).

The only place where config values are scaled: the learning rate by global batch / 512 and
epochs into steps, so a batch-size override on the command line keeps the recipe consistent.
"""

import math

import jax
import optax


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Peak learning rate: `base_lr` is per 512 images, scaled linearly with the global batch."""
    return base_lr * batch_size / 512


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last partial batch is dropped, as the loader does)."""
    if batch_size <= 0 or num_examples < batch_size:
        raise ValueError(f"{batch_size=} must be in [1, {num_examples=}]")
    return num_examples // batch_size


def schedule_steps(opt, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole schedule: `opt.epochs` epochs, rounded."""
    return round(opt.epochs * steps_per_epoch)


def make_schedule(opt, batch_size: int, steps_per_epoch: int) -> optax.Schedule:
    """Per-step lr: linear warmup from `warmup_lr` to the peak, then cosine down to `min_lr`.

    Args:
      opt: the `optimizer` config section (base_lr, warmup_lr, min_lr, epochs, warmup_epochs).
      batch_size: global batch size (images per optimizer step).
      steps_per_epoch: optimizer steps per epoch.
    """
    total = schedule_steps(opt, steps_per_epoch)
    warmup = round(opt.warmup_epochs * steps_per_epoch)
    if not 0 <= warmup < total:
        raise ValueError(f"need 0 <= warmup steps ({warmup}) < total steps ({total})")
    peak = scaled_lr(opt.base_lr, batch_size)
    warm = optax.linear_schedule(opt.warmup_lr, peak, max(warmup, 1))
    # optax's cosine ends at alpha * peak after decay_steps; step `total` gets exactly min_lr.
    cosine = optax.cosine_decay_schedule(peak, total - warmup, alpha=opt.min_lr / peak)
    return optax.join_schedules([warm, cosine], [warmup])


def decay_mask(params):
    """Pytree of bools like `params`: True where weight decay applies (no norms/biases/pos_embed).

    Works on arrays and on `jax.ShapeDtypeStruct`s (optax calls it on the params in `init`).
    """

    # As timm's rule for the official recipe: every 1-D param is a norm weight/bias or a bias, so
    # the rank decides without depending on module names; the position table is named.
    def decays(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        return leaf.ndim > 1 and "pos_embed" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decoupled decay on the `decay_mask` params.

    Args:
      opt: the `optimizer` config section (b1, b2, eps, weight_decay, clip_norm).
      schedule: per-step learning rate.
    """
    if not (opt.clip_norm > 0 and math.isfinite(opt.clip_norm)):
        raise ValueError(f"optimizer.clip_norm must be positive and finite, got {opt.clip_norm}")
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    )
