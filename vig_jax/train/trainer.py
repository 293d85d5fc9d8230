"""Builds the pieces of a run from its config: model, optimizer, sharded state, jitted steps.

Shared by the loop (`loop.py`), evaluation (`vig_jax/evaluate.py`) and the step benchmark, so all
three run the same jitted functions with the same shardings.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from vig_jax.models import create_model
from vig_jax.train import optim, sharding
from vig_jax.train.state import TrainState, init_state
from vig_jax.train.step import make_eval_step, make_train_step

_OOM_HINT = (
    "Out of device memory. Try a smaller --config.data.batch_size, micro-batches with "
    "--config.optimizer.grad_accum_steps=N (same update, 1/N of the activations), bf16 compute "
    "(--config.model.dtype=bfloat16), or --config.mesh.fsdp=True to shard params and optimizer "
    "state over the devices."
)


@contextlib.contextmanager
def oom_hint():
    """Re-raises XLA's RESOURCE_EXHAUSTED errors with what to change in the config."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            raise RuntimeError(f"{_OOM_HINT}\nXLA said: {e}") from e
        raise


def build_model(config, num_classes: int) -> nn.Module:
    """`create_model` from the `model` config section."""
    m = config.model
    return create_model(
        m.name,
        num_classes=num_classes,
        dtype=jnp.dtype(m.dtype),
        bigla_impl=m.bigla_impl,
        **m.overrides.to_dict(),
    )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A run's model, optimizer and jitted, sharded functions.

    Attributes:
      model, schedule, tx: as built from the config.
      mesh: the device mesh.
      abstract_state: TrainState of `jax.ShapeDtypeStruct`s carrying their shardings.
      init: `init(key) -> TrainState`, jitted to produce the state already sharded.
      train_step: `train_step(state, batch) -> (state, metrics)`, state donated.
      eval_step: `eval_step(params, batch) -> sums` (see `step.make_eval_step`).
    """

    model: nn.Module
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    mesh: Mesh
    abstract_state: TrainState
    init: Callable
    train_step: Callable
    eval_step: Callable


def _traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the context mesh: the Pallas BiGLA kernel reads it to run on each
    device's shard of the batch (see `pallas_kernels.bigla._per_batch_shard`)."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def make_trainer(config, *, mesh: Mesh, num_classes: int, steps_per_epoch: int) -> Trainer:
    """Builds everything from `config` (see configs/common.py) for a run on `mesh`."""
    batch = config.data.batch_size
    n_dev = mesh.devices.size
    accum = config.optimizer.grad_accum_steps
    if accum < 1:
        raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {accum}")
    if batch % accum or (batch // accum) % n_dev:
        raise ValueError(
            f"data.batch_size={batch} must split into optimizer.grad_accum_steps="
            f"{accum} micro-batches divisible by the {n_dev} devices"
        )
    if config.data.eval_batch_size % n_dev:
        raise ValueError(f"data.eval_batch_size={config.data.eval_batch_size} % {n_dev} devices")

    model = build_model(config, num_classes)
    schedule = optim.make_schedule(config.optimizer, batch, steps_per_epoch)
    tx = optim.make_optimizer(config.optimizer, schedule)
    size = config.data.image_size

    def init_params(key):
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        return model.init(key, images, train=False)["params"]

    init = functools.partial(init_state, init_params, tx, use_ema=config.optimizer.ema_decay > 0)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sh = sharding.state_shardings(
        abstract, mesh, fsdp=config.mesh.fsdp, fsdp_min_size=config.mesh.fsdp_min_size
    )
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh
    )
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    train_step = jax.jit(
        _traced_under(mesh, make_train_step(model, tx, schedule, config, num_classes)),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        _traced_under(mesh, make_eval_step(model, config, num_classes)),
        in_shardings=(state_sh.params, batch_sh),
        out_shardings=rep,
    )
    return Trainer(
        model=model,
        schedule=schedule,
        tx=tx,
        mesh=mesh,
        abstract_state=abstract,
        init=jax.jit(init, out_shardings=state_sh),
        train_step=train_step,
        eval_step=eval_step,
    )
