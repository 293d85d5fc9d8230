"""`train_and_evaluate(config, workdir)`: the training loop, resumable and sharded.

Reads as a table of contents: mesh, data, trainer, restore (or init), then the step loop with
log / eval / checkpoint hooks. The resume order is: the latest checkpoint in `workdir`, else a
fresh initialisation from `config.seed`.
"""

import pathlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from vig_jax import data
from vig_jax.train import optim, sharding
from vig_jax.train.checkpoint import Checkpointer
from vig_jax.train.metrics import MetricsWriter, Progress, peak_memory_gb
from vig_jax.train.trainer import Trainer, make_trainer, oom_hint


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


def _train_iterator(config, shard_batch: int):
    d = config.data
    return data.make_train_iterator(
        dataset=d.dataset,
        data_dir=d.data_dir,
        split=d.train_split,
        image_size=d.image_size,
        batch_size=shard_batch,
        seed=config.seed,
        augment=d.augment.to_dict(),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_workers=d.num_workers,
    )


# A host copy of the eval batches is kept when they fit in this many bytes (Fashion-MNIST's test
# split at 56 px: 94 MB; ImageNet's validation split at 224 px, 7.5 GB, is read again every time).
EVAL_CACHE_MAX_BYTES = 2 << 30


class EvalBatches:
    """This process's batches of `config.data.eval_split`, iterable once per evaluation.

    The first pass reads them through the input pipeline; if they fit in `max_bytes` they are kept
    in host memory and later passes replay them (the eval transform is deterministic, so they are
    the same batches), which saves restarting the pipeline's worker processes for every evaluation
    (each evaluation took ~5 s in the H100 Fashion-MNIST run, for 10k 56-px images that need a
    fraction of a second of GPU time). Otherwise every pass reads them again.
    """

    def __init__(self, config, max_bytes: int = EVAL_CACHE_MAX_BYTES):
        self._config, self._max_bytes = config, max_bytes
        self._cached: list[dict[str, np.ndarray]] | None = None

    def _read(self):
        d = self._config.data
        return data.make_eval_iterator(
            dataset=d.dataset,
            data_dir=d.data_dir,
            split=d.eval_split,
            image_size=d.image_size,
            crop_pct=d.crop_pct,
            batch_size=d.eval_batch_size // jax.process_count(),
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            num_workers=d.num_workers,
        )

    def __iter__(self):
        if self._cached is not None:
            yield from self._cached
            return
        kept, size = [], 0
        for batch in self._read():
            if kept is not None:
                size += sum(x.nbytes for x in batch.values())
                if size <= self._max_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._cached = kept


def evaluate(trainer: Trainer, params, config, batches: EvalBatches | None = None):
    """One pass over `config.data.eval_split` (or over `batches`, to reuse them across calls):
    {"loss", "top1", "top5"} over the real examples."""
    if batches is None:
        batches = EvalBatches(config, max_bytes=0)
    sums = None
    for local in batches:
        out = trainer.eval_step(params, sharding.global_batch(local, trainer.mesh))
        sums = out if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {
        "loss": float(sums["loss_sum"]) / count,
        "top1": float(sums["top1"]) / count,
        "top5": float(sums["top5"]) / count,
    }


class _StopRequest:
    """Turns SIGTERM into a flag the loop polls: it then saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _stop_agreed(requested: bool, step: int, every: int) -> bool:
    """Whether all processes stop after `step`: any process's SIGTERM stops every process.

    With several processes the flags are gathered every `every` steps only (a collective), so
    all processes save the same step; a single process checks every step.
    """
    if jax.process_count() == 1:
        return requested
    if step % every:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(requested))))


def _check_finite(window: list[tuple[int, dict]], last_good_step: int | None) -> list[dict]:
    """Host copies of the window's metrics; raises at the first non-finite loss or gradient.

    The gradient norm is checked too: a non-finite gradient with a finite loss already puts
    NaNs in the params, which must not be checkpointed.
    """
    host = jax.device_get([m for _, m in window])
    for (step, _), m in zip(window, host, strict=True):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            raise NonFiniteLossError(
                f"loss is {float(m['loss'])} (gradient norm {float(m['grad_norm'])}) at step "
                f"{step}; training stopped. The last good checkpoint is step {last_good_step} "
                "(restarting resumes from it)."
            )
    return host


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, float]:
    """Trains per `config` (see configs/common.py), writing checkpoints and metrics to `workdir`.

    Resumes from the latest checkpoint in `workdir/checkpoints` if there is one. Returns the
    last evaluation metrics ({"eval/top1", ...}).

    Raises:
      NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
      ValueError: inconsistent config (batch sizes vs devices and processes, schedule lengths).
    """
    workdir = pathlib.Path(workdir)
    loop = config.loop
    mesh = sharding.make_mesh()
    info = data.dataset_info(config.data.dataset, config.data.data_dir)
    batch = config.data.batch_size
    if batch % jax.process_count():
        raise ValueError(f"data.batch_size={batch} % {jax.process_count()} processes != 0")
    spe = optim.steps_per_epoch(info.num_examples[config.data.train_split], batch)
    total_steps = loop.total_steps or optim.schedule_steps(config.optimizer, spe)
    trainer = make_trainer(config, mesh=mesh, num_classes=info.num_classes, steps_per_epoch=spe)

    train_iter = _train_iterator(config, batch // jax.process_count())
    ckpt = Checkpointer(workdir / "checkpoints", keep=loop.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        state = trainer.init(jax.random.PRNGKey(config.seed))
        start = 0
    else:
        state, data_state = ckpt.restore(start, trainer.abstract_state)
        train_iter.set_state(data_state)
    last_ckpt = start if start else None

    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=is_main)
    progress = Progress(
        initial=start, total=total_steps, batch_size=batch, enabled=loop.progress_bar
    )
    if start:
        progress.write(f"resumed from step {start} in {workdir / 'checkpoints'}")
    eval_metrics: dict[str, float] = {}
    eval_batches = EvalBatches(config)
    window: list[tuple[int, dict]] = []  # device metrics of the steps not yet logged
    try:
        with _StopRequest() as stop:
            for step in range(start + 1, total_steps + 1):
                global_batch = sharding.global_batch(next(train_iter), mesh)
                with oom_hint():
                    state, metrics = trainer.train_step(state, global_batch)
                window.append((step, metrics))
                last = step == total_steps
                # SIGTERM: save right away, no evaluation (grace periods before SIGKILL are short).
                stopping = _stop_agreed(stop.requested, step, loop.log_every_steps)
                save = last or stopping or step % loop.ckpt_every_steps == 0
                if save or step % loop.log_every_steps == 0:
                    host = _check_finite(window, last_ckpt)
                    mean = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
                    mean["train/lr"] = float(host[-1]["lr"])
                    mean["train/img_per_s"] = progress.update(
                        step, mean["train/loss"], mean["train/lr"]
                    )
                    peak = peak_memory_gb()
                    if peak is not None:
                        mean["device/peak_memory_gb"] = peak
                    writer.write(step, mean)
                    window = []
                if last or step % loop.eval_every_steps == 0:
                    eval_metrics = _evaluate_all(trainer, state, config, eval_batches)
                    writer.write(step, eval_metrics)
                    progress.write(f"step {step}: " + _format(eval_metrics))
                if save:
                    ckpt.save(step, state, train_iter.get_state())
                    last_ckpt = step
                if stopping:
                    progress.write(f"SIGTERM: saved checkpoint at step {step}, exiting")
                    break
    finally:
        train_iter.close()  # grain's threads / worker processes must not outlive the run
        ckpt.wait()
        ckpt.close()
        progress.close()
        writer.close()
    return eval_metrics


def _evaluate_all(trainer: Trainer, state, config, batches: EvalBatches) -> dict[str, float]:
    out = {f"eval/{k}": v for k, v in evaluate(trainer, state.params, config, batches).items()}
    if state.ema is not None:
        ema = evaluate(trainer, state.ema, config, batches)
        out |= {f"eval_ema/{k}": v for k, v in ema.items()}
    return out


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
