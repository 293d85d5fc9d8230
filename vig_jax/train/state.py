"""Train state: a plain pytree (step, params, opt_state, ema, key), created from abstract shapes."""

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; checkpointed whole.

    Attributes:
      step: int32 scalar, optimizer steps done.
      params: float32 model params (compute dtype is the model's, params stay float32).
      opt_state: optax state of `tx`.
      ema: exponential moving average of `params`, or None when disabled.
      key: uint32 [2] root PRNG key; step `s` uses `fold_in(key, s)`.
    """

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema: dict | None
    key: jax.Array


def init_state(
    init_params: Callable[[jax.Array], dict],
    tx: optax.GradientTransformation,
    key: jax.Array,
    *,
    use_ema: bool,
) -> TrainState:
    """Builds a TrainState from `init_params(key) -> params`; jit it with out_shardings to place it.

    Args:
      init_params: e.g. `lambda k: model.init(k, images, train=False)["params"]`.
      tx: the optimizer.
      key: uint32 [2] PRNG key (raw, not a typed key: orbax saves it as a plain array).
      use_ema: keep an EMA copy of the params.
    """
    init_key, run_key = jax.random.split(key)
    params = init_params(init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
        key=run_key,
    )
