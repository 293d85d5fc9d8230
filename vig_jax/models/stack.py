"""How a model runs its stack of blocks: unrolled, rematerialised per block, or as one scan.

Both options keep the parameter tree of the plain unrolled stack (`blocks_0`, `blocks_1`, ...), so
the converter, checkpoints and golden files are the same with or without them.

- remat "block": jax.checkpoint per block saving the matmul outputs and BiGLA's output (its
  custom_vjp keeps only its inputs as residuals, which are cheap to recompute from the saved
  matmul outputs; with the output saved, the recomputed forward kernel has no user and XLA can drop
  it: not yet confirmed in a GPU profile); the elementwise work (norms, gates, SiLU, the depthwise
  conv) is recomputed in the backward pass.
- remat "full": per block, nothing saved but the block's input.
- scan: blocks of one stage differ only in their stochastic-depth rate, so their parameters are
  stacked at run time (a copy of the block parameters per step, small next to the activations) and
  the stage is one `lax.scan` whose body XLA compiles once instead of once per block.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

REMAT_MODES = ("none", "block", "full")
BIGLA_OUTPUT = "bigla_out"  # checkpoint_name of BiGLA's output in the GLA layer


def remat_policy(remat: str):
    """The jax.checkpoint policy of a remat mode ("block" or "full")."""
    if remat == "block":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(BIGLA_OUTPUT),
        )
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"remat={remat!r} must be one of {REMAT_MODES}")


def check_remat(remat: str) -> None:
    """Raises ValueError for a remat mode not in REMAT_MODES."""
    if remat not in REMAT_MODES:
        raise ValueError(f"remat={remat!r} must be one of {REMAT_MODES}")


def _call(block: nn.Module, x: jax.Array, train: bool | None) -> jax.Array:
    return block(x) if train is None else block(x, train=train)


def apply_block(block: nn.Module, x: jax.Array, *, train: bool | None, remat: str) -> jax.Array:
    """block(x, train=train) (block(x) for train=None: blocks without a train mode), rematerialised
    per `remat` ("none", "block" or "full")."""
    check_remat(remat)
    if remat == "none":
        return _call(block, x, train)
    # static_argnums counts the module as argument 0: `train` (a Python bool) is argument 2.
    return nn.remat(_call, static_argnums=(2,), policy=remat_policy(remat))(block, x, train)


def scan_blocks(
    parent: nn.Module,
    blocks: list[nn.Module],
    x: jax.Array,
    *,
    train: bool,
    remat: str,
) -> jax.Array:
    """blocks applied in order, as one lax.scan over their parameters stacked at run time.

    The blocks must be bound submodules of `parent` (defined in its setup), have their parameters
    already (call it from apply, not init) and differ only in the field `drop_path`, which becomes
    a traced per-step value. Stochastic depth draws its masks from keys split off `parent`'s
    "dropout" stream, so in training the masks differ from the unrolled stack's (same law).

    Args:
      parent: the module owning `blocks` (its "dropout" rng is used when training).
      blocks: at least one block with `__call__(x, *, train)` and a float field `drop_path`.
      x: the stack's input, e.g. [B, h, w, D].
      train: enables stochastic depth.
      remat: "none", "block" or "full", applied to the scan body.

    Returns:
      The last block's output, same shape and dtype as x.
    """
    check_remat(remat)
    params = [block.variables["params"] for block in blocks]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
    rates = np.array([block.drop_path for block in blocks])
    dropout = train and bool(rates.any())
    keys = jax.random.split(parent.make_rng("dropout"), len(blocks)) if dropout else None
    template = blocks[0].clone(parent=None)

    def body(x, step):
        p, rate, key = step
        block = template.clone(drop_path=rate if dropout else 0.0)
        rngs = {"dropout": key} if dropout else None
        return block.apply({"params": p}, x, train=train, rngs=rngs), None

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(rates, jnp.float32), keys))
    return x
