"""Pure train and eval steps (the recipe: docs/training.md); `loop.py` jits them with shardings.

Device-side augmentation happens here, on the global batch: normalize, random erasing, then
mixup/cutmix (which produces the smoothed soft targets) or plain label smoothing.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from vig_jax.data import mix
from vig_jax.train.losses import smooth_labels, soft_cross_entropy, topk_correct
from vig_jax.train.state import TrainState


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config,
    num_classes: int,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns `train_step(state, batch) -> (state, metrics)`, pure and jittable.

    Args:
      model: Flax module; `apply({"params": p}, images, train=True, rngs={"dropout": k})` -> logits.
      tx: optimizer from `optim.make_optimizer`.
      schedule: the same schedule, only to report the lr of each step.
      config: the full run config (reads `data.mean/std`, `aug.*`, `optimizer.grad_accum_steps`,
        `optimizer.ema_decay`).
      num_classes: C.

    The returned step takes `batch = {"image": uint8 [B, S, S, 3], "label": int32 [B]}` and
    returns metrics `{"loss", "grad_norm", "lr"}` (float32 scalars, loss averaged over B).
    """
    aug, opt = config.aug, config.optimizer
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    use_mix = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0
    accum = opt.grad_accum_steps  # >= 1: checked by make_trainer, which splits the batch by it
    if not 0.0 <= opt.ema_decay < 1.0:
        raise ValueError(f"optimizer.ema_decay must be in [0, 1), got {opt.ema_decay}")

    def loss_fn(params, images, targets, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return soft_cross_entropy(logits, targets).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        erase_key, mix_key, drop_key = jax.random.split(key, 3)
        images = mix.normalize(batch["image"], mean, std)  # [B, S, S, 3] float32
        if aug.random_erasing > 0:
            images = mix.random_erasing(erase_key, images, aug.random_erasing)
        targets = smooth_labels(batch["label"], num_classes, aug.label_smoothing)  # [B, C]
        if use_mix:
            images, targets = mix.mixup_cutmix(
                mix_key,
                images,
                targets,
                mixup_alpha=aug.mixup_alpha,
                cutmix_alpha=aug.cutmix_alpha,
                switch_prob=aug.switch_prob,
            )

        b = images.shape[0]
        if b % accum:
            raise ValueError(f"batch {b} is not divisible by grad_accum_steps {accum}")

        # [B, ...] -> [A, B/A, ...] taking every A-th example, so each micro-batch keeps the
        # batch axis split over the data axis exactly as the full batch was (no resharding).
        def micro(x):
            return x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)

        def accumulate(carry, xs):
            loss_sum, grad_sum = carry
            i, images_i, targets_i = xs
            drop_key_i = jax.random.fold_in(drop_key, i)
            loss, grads = grad_fn(state.params, images_i, targets_i, drop_key_i)
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        xs = (jnp.arange(accum), micro(images), micro(targets))
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), xs)
        # Equal micro-batch sizes: the mean of micro-batch means is the full-batch mean.
        loss = loss_sum / accum
        grads = jax.tree_util.tree_map(lambda g: g / accum, grad_sum)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = optax.incremental_update(params, ema, step_size=1.0 - opt.ema_decay)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        metrics = {"loss": loss, "grad_norm": _global_norm(grads), "lr": schedule(state.step)}
        return new_state, metrics

    return train_step


def _global_norm(tree) -> jax.Array:
    # optax renamed its helper between the versions we support (global_norm -> tree_norm).
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def make_eval_step(model: nn.Module, config, num_classes: int) -> Callable[[dict, dict], dict]:
    """Returns `eval_step(params, batch) -> sums`, pure and jittable.

    `batch = {"image": uint8 [B, S, S, 3], "label": int32 [B], "mask": bool [B]}`; padded examples
    (mask False) count nowhere. Returns float32 scalars `loss_sum` (plain cross-entropy),
    `top1`, `top5` (correct counts) and `count` (real examples), to be summed over batches.
    """
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    top5 = min(5, num_classes)

    def eval_step(params: dict, batch: dict) -> dict:
        images = mix.normalize(batch["image"], mean, std)
        logits = model.apply({"params": params}, images, train=False)  # [B, C]
        mask = batch["mask"].astype(jnp.float32)
        onehot = jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)
        return {
            "loss_sum": jnp.sum(soft_cross_entropy(logits, onehot) * mask),
            "top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
            "top5": jnp.sum(topk_correct(logits, batch["label"], top5) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step
