"""Builds the pieces of a run from its config: model, optimizer, sharded state, jitted steps.

Shared by the loop (`loop.py`), evaluation (`vig_jax/evaluate.py`) and the step benchmark, so all
three run the same jitted functions with the same shardings. `plan_run` checks every config field
against the dataset and the devices before anything is compiled, raising a one-line `UserError`.
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

from vig_jax import models
from vig_jax.models import create_model
from vig_jax.train import optim, sharding
from vig_jax.train.errors import UserError
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
        remat=m.remat,
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
        raise UserError(f"optimizer.grad_accum_steps must be >= 1, got {accum}")
    if batch < 1 or batch % accum or (batch // accum) % n_dev:
        raise UserError(
            f"data.batch_size={batch} must split into optimizer.grad_accum_steps="
            f"{accum} micro-batches divisible by the {n_dev} devices"
        )
    if config.data.eval_batch_size < 1 or config.data.eval_batch_size % n_dev:
        raise UserError(
            f"data.eval_batch_size={config.data.eval_batch_size} must be a positive multiple of "
            f"the {n_dev} devices"
        )
    try:
        model = build_model(config, num_classes)
        schedule = optim.make_schedule(config.optimizer, batch, steps_per_epoch)
        tx = optim.make_optimizer(config.optimizer, schedule)
    except (ValueError, TypeError) as e:  # names and values the config gave them
        raise UserError(f"config: {e}") from e
    size = config.data.image_size

    def init_params(key):
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        return model.init(key, images, train=False)["params"]

    init = functools.partial(init_state, init_params, tx, use_ema=config.optimizer.ema_decay > 0)
    try:
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    except (ValueError, TypeError) as e:  # shape errors, e.g. an image too small for the strides
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model {config.model.name!r} cannot be built for data.image_size={size}: {first}"
        ) from e
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
        compiler_options=models.inference_compiler_options(mesh.devices.flat[0].platform),
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


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A validated run: its trainer and the sizes the loop needs.

    Attributes:
      trainer: as `make_trainer` builds it.
      num_classes: labels of the dataset.
      train_examples, eval_examples: sizes of `data.train_split` and `data.eval_split`.
      steps_per_epoch: optimizer steps per epoch of the train split.
      total_steps: where the run ends (`loop.total_steps`, else `optimizer.epochs` epochs).
      eval_every_steps, ckpt_every_steps: `loop.*_every_steps`, or `loop.*_every_epochs` in steps.
    """

    trainer: Trainer
    num_classes: int
    train_examples: int
    eval_examples: int
    steps_per_epoch: int
    total_steps: int
    eval_every_steps: int
    ckpt_every_steps: int


def _split_size(d, field: str) -> int:
    """Examples in the split named by `config.data.<field>` (a name or a TFDS slice)."""
    from vig_jax.data import sources  # TFDS: only runs need it, not the step benchmarks

    split = d[field]
    try:
        size = len(sources.data_source(d.dataset, d.data_dir, split))
    except ValueError as e:
        raise UserError(f"data.{field}={split!r}: {e}") from None
    if size < 1:
        raise UserError(f"data.{field}={split!r} of {d.dataset!r} is empty")
    return size


def _check_ranges(config) -> None:
    """Fields whose valid range needs no dataset or device (one `UserError` per bad field)."""
    d, lp, o = config.data, config.loop, config.optimizer
    checks = [
        (d.image_size >= 1, f"data.image_size must be >= 1, got {d.image_size}"),
        (0 < d.crop_pct <= 1, f"data.crop_pct must be in (0, 1], got {d.crop_pct}"),
        (d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}"),
        (d.read_threads >= 1, f"data.read_threads must be >= 1, got {d.read_threads}"),
        (len(d.mean) == len(d.std) == 3, "data.mean and data.std need 3 values (RGB)"),
        (lp.total_steps is None or lp.total_steps >= 1, "loop.total_steps must be >= 1 or None"),
        (o.epochs > 0, f"optimizer.epochs must be > 0, got {o.epochs}"),
        (0 <= o.ema_decay < 1, f"optimizer.ema_decay must be in [0, 1), got {o.ema_decay}"),
    ]
    for name in ("log_every_steps", "keep_checkpoints"):
        value = lp[name]
        checks.append((value >= 1, f"loop.{name} must be >= 1, got {value}"))
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _interval(lp, what: str, steps_per_epoch: int) -> int:
    """`loop.<what>_every_steps`, or `loop.<what>_every_epochs` in steps: exactly one is set."""
    steps, epochs = lp[f"{what}_every_steps"], lp[f"{what}_every_epochs"]
    if (steps is None) == (epochs is None):
        raise UserError(
            f"set exactly one of loop.{what}_every_steps and loop.{what}_every_epochs "
            f"(got {steps} and {epochs})"
        )
    if steps is not None and steps < 1:
        raise UserError(f"loop.{what}_every_steps must be >= 1, got {steps}")
    if epochs is not None and epochs <= 0:
        raise UserError(f"loop.{what}_every_epochs must be > 0, got {epochs}")
    return steps if steps is not None else max(1, round(epochs * steps_per_epoch))


def plan_run(config, mesh: Mesh) -> RunPlan:
    """Checks every field of `config` against the dataset and `mesh`, then builds the trainer.

    Prepares the local datasets if needed (see `vig_jax.data.sources`); compiles nothing.

    Raises:
      UserError: one line naming the field and what is wrong: a value out of range, a batch
        size that does not divide over the processes or devices, a split that does not exist,
        a dataset that is not prepared, a model that cannot take the image size.
    """
    from vig_jax import data

    _check_ranges(config)
    d = config.data
    try:
        info = data.dataset_info(d.dataset, d.data_dir)
    except (ValueError, FileNotFoundError) as e:  # unknown or not prepared: the message says
        raise UserError(str(e)) from None
    train_examples = _split_size(d, "train_split")
    eval_examples = _split_size(d, "eval_split")
    processes = jax.process_count()
    for field in ("batch_size", "eval_batch_size"):
        if d[field] < 1 or d[field] % processes:
            raise UserError(f"data.{field}={d[field]} must be a positive multiple of {processes=}")
    if d.batch_size > train_examples:
        raise UserError(
            f"data.batch_size={d.batch_size} exceeds the {train_examples} examples of "
            f"data.train_split={d.train_split!r}"
        )
    spe = optim.steps_per_epoch(train_examples, d.batch_size)
    eval_every, ckpt_every = (_interval(config.loop, what, spe) for what in ("eval", "ckpt"))
    trainer = make_trainer(config, mesh=mesh, num_classes=info.num_classes, steps_per_epoch=spe)
    return RunPlan(
        trainer=trainer,
        num_classes=info.num_classes,
        train_examples=train_examples,
        eval_examples=eval_examples,
        steps_per_epoch=spe,
        total_steps=config.loop.total_steps or optim.schedule_steps(config.optimizer, spe),
        eval_every_steps=eval_every,
        ckpt_every_steps=ckpt_every,
    )
