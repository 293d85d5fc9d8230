"""Optimizer and schedule of the training recipe (docs/training.md).

The only place where config values are scaled: the learning rate by global batch / 512 and
epochs into steps, so a batch-size override on the command line keeps the recipe consistent.

Fine-tuning knobs (docs/finetuning.md): `layer_decay` (layer-wise learning-rate decay as in BEiT
and DeiT III: the head at the full rate, each block below it `layer_decay` times the one above,
the stem and position table lowest) and `freeze_backbone` (a linear probe: only the head learns).
"""

import math
import re

import jax
import jax.numpy as jnp
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


# Top-level param names by place in the network (all registered models: ViG, ViG-H, DeiT).
_EMBED_NAMES = {"stem", "pos_embed", "patch_embed", "cls_token"}
_TAIL_NAMES = {"norm", "head_norm", "head"}
_BLOCK = re.compile(r"(?:blocks_|block)(\d+)$|stages_(\d+)_(\d+)$|downsamples_(\d+)$")
HEAD = "head"


def layer_ids(params) -> tuple[dict, int]:
    """(pytree of ints like `params`, L): each param's layer, 0 .. L + 1, for layer-wise decay.

    As BEiT numbers them: the stem / patch embedding, position table and class token are layer 0,
    the i-th block (counted across all stages) is layer i + 1, the final norm and the head are
    layer L + 1 (L blocks). A ViG-H downsampling layer belongs to the first block after it, as
    ConvNeXt's fine-tuning code assigns them.

    Raises:
      ValueError: a top-level param name outside these groups (lists it).
    """
    names = list(params)
    blocks = {}  # top-level name -> sort key (stage, index, before-block)
    for name in names:
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(1) is not None:
            blocks[name] = (0, int(m.group(1)), 1)
        elif m.group(2) is not None:
            blocks[name] = (int(m.group(2)), int(m.group(3)), 1)
        else:  # downsamples_k runs before stage k + 1's first block
            blocks[name] = (int(m.group(4)) + 1, -1, 0)
    unknown = sorted(n for n in names if n not in blocks and n not in _EMBED_NAMES | _TAIL_NAMES)
    if unknown:
        raise ValueError(f"layer_decay: no layer known for top-level params {unknown}")
    real = sorted(k for n, k in blocks.items() if k[2])
    depth = len(real)
    ids = {n: 0 for n in names if n in _EMBED_NAMES} | {n: depth + 1 for n in _TAIL_NAMES}
    for name, k in blocks.items():
        # Block ordinal + 1; a downsampling layer takes the id of the first block after it.
        ids[name] = 1 + next(i for i, b in enumerate(real) if b[:2] >= k[:2])
    tree = {
        name: jax.tree_util.tree_map(lambda _, i=ids[name]: i, sub) for name, sub in params.items()
    }
    return tree, depth


def layer_scales(params, decay: float):
    """Pytree of floats like `params`: decay ** (L + 1 - layer id) (1 for the head)."""
    ids, depth = layer_ids(params)
    return jax.tree_util.tree_map(lambda i: decay ** (depth + 1 - i), ids)


def head_mask(params):
    """Pytree of bools like `params`: True for the head's params (what a linear probe trains)."""
    return {
        name: jax.tree_util.tree_map(lambda _, h=name == HEAD: h, sub)
        for name, sub in params.items()
    }


def _scale_by_layer(decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its `layer_scales`: the learning rate (and with it the decoupled
    weight decay, as torch's per-group lr does) of layer i is lr * decay ** (L + 1 - i)."""

    def scale(updates, params):
        del params
        factors = layer_scales(updates, decay)
        return jax.tree_util.tree_map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)

    return optax.stateless(scale)


def make_optimizer(opt, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decoupled decay on the `decay_mask` params; then the
    fine-tuning knobs `layer_decay` and `freeze_backbone`.

    Args:
      opt: the `optimizer` config section (b1, b2, eps, weight_decay, clip_norm, layer_decay,
        freeze_backbone).
      schedule: per-step learning rate.
    """
    if not (opt.clip_norm > 0 and math.isfinite(opt.clip_norm)):
        raise ValueError(f"optimizer.clip_norm must be positive and finite, got {opt.clip_norm}")
    if not 0.0 < opt.layer_decay <= 1.0:
        raise ValueError(f"optimizer.layer_decay must be in (0, 1], got {opt.layer_decay}")
    parts = [
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    ]
    if opt.layer_decay < 1.0:
        parts.append(_scale_by_layer(opt.layer_decay))
    tx = optax.chain(*parts)
    if opt.freeze_backbone:
        # The head alone is clipped and updated (no optimizer state for the rest); the backbone
        # gets zero updates, so weight decay does not shrink it either.
        def labels(params):
            return jax.tree_util.tree_map(lambda h: "train" if h else "frozen", head_mask(params))

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
