"""Orbax checkpoints of the train state and the data iterator; the only module importing orbax.

A checkpoint at step s holds `state/` (the whole TrainState: params, opt_state, ema, key, step),
`data/` (the data iterator state as JSON) and `checksums/` (one checksum per array of the state,
computed on the devices before the save), so a restored run continues exactly where the saved one
was, or the restore fails (the checksums catch a damaged chunk that tensorstore still decodes
without error). Saves are asynchronous: the arrays are copied off the device, then written in a
thread while training continues; orbax only makes a step directory visible once it is complete, so
a SIGKILL mid-write leaves the previous checkpoint as the latest.

Faults (docs/faults.md): a save that fails or stalls in its thread is reported by `check()`, which
the loop calls after every step, as a `CheckpointSaveError` naming the path and the cause;
`restore_latest` walks back from the newest checkpoint to the newest one that restores completely,
moving each unreadable one aside (never deleting it); a checkpoint of another model is a
`UserError`, not corruption.
"""

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vig_jax.train.errors import CheckpointSaveError, UserError

# A save still running after this long is reported as stalled (orbax's async timeout).
SAVE_TIMEOUT_S = 600
# Seconds given to the leftover reads of a failed restore (see `restore_latest`).
RESTORE_DRAIN_S = 1.0


def describe(error: BaseException) -> str:
    """`Type: first line` of the innermost cause of `error`: the one line worth showing."""
    while error.__cause__ is not None or (
        error.__context__ is not None and not error.__suppress_context__
    ):
        error = error.__cause__ or error.__context__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else repr(error)
    return f"{type(error).__name__}: {text[:300]}"


def _path_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _named_leaves(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(map(_path_name, path)): leaf for path, leaf in leaves}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"params/a/kernel": shape} of a pytree of arrays or of orbax array metadata."""
    return {path: tuple(leaf.shape) for path, leaf in _named_leaves(tree).items()}


def _difference(saved: dict, wanted: dict) -> str:
    """What differs between two `_shapes` dicts, for a one-line message ('' when equal)."""
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    common = sorted(set(saved) & set(wanted))
    shaped = [f"{k} {saved[k]} vs {wanted[k]}" for k in common if saved[k] != wanted[k]]
    parts = [
        f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (
            ("only in the config", missing),
            ("only in the checkpoint", extra),
            ("shape checkpoint vs config", shaped),
        )
        if items
    ]
    return "; ".join(parts)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 sum of the leaf's bits, each 32-bit word weighted by an odd number of its position
    (mod 2^32): any change of one word changes it, a garbled run of words almost surely."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        narrow = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
        words = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 64-bit: two words
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(state) -> dict:
    return jax.tree.map(_leaf_checksum, state)


def state_checksums(state) -> dict[str, int]:
    """{"params/a/kernel": checksum} of every array of `state` (`_leaf_checksum`), computed on the
    devices where the arrays are (a sharded array gets one checksum of all of it)."""
    sums = jax.device_get(_checksums(state))
    return {path: int(value) for path, value in _named_leaves(sums).items()}


class ChecksumError(ValueError):
    """A restored checkpoint's arrays differ from the checksums saved with them."""


class Checkpointer:
    """Saves and restores (TrainState, data iterator state) pairs under `directory`.

    Args:
      directory: checkpoint root (created if missing); one subdirectory per step.
      keep: how many of the most recent checkpoints to keep.
      save_timeout_s: a save still running after this many seconds counts as failed (stalled);
        None: `SAVE_TIMEOUT_S`.
    """

    def __init__(
        self, directory: str | pathlib.Path, *, keep: int, save_timeout_s: int | None = None
    ):
        if keep < 1:
            raise UserError(f"loop.keep_checkpoints must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=True,
            # Leftovers of a save cut short (SIGKILL) go at the next start.
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(timeout_secs=save_timeout_s or SAVE_TIMEOUT_S),
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise UserError(f"cannot use {self.directory} for checkpoints: {describe(e)}") from e
        self._pending: int | None = None  # step of the save that may still be running

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> None:
        """Starts an asynchronous save of `state` and `data_state` at `step`.

        Raises:
          CheckpointSaveError: the previous save failed, or this one cannot start.
        """
        self.check(block=True)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            checksums=ocp.args.JsonSave(state_checksums(state)),
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise CheckpointSaveError(
                f"saving checkpoint {self.directory / str(step)} failed: {describe(e)}"
            ) from e
        self._pending = step

    def check(self, *, block: bool = False) -> None:
        """Raises `CheckpointSaveError` if the last save failed (or stalled past the timeout).

        Cheap while that save is still running: it is then checked at a later call. With `block`,
        waits for it to end first.
        """
        if self._pending is None or (not block and self._manager.is_saving_in_progress()):
            return
        step, self._pending = self._pending, None
        try:
            # Returns at once when the save is over; re-raises the error of its thread.
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveError(
                f"saving checkpoint {self.directory / str(step)} failed: {describe(e)}"
            ) from e

    def restore(self, step: int, abstract_state):
        """Restores `(state, data_state)` saved at `step`.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set: the arrays are
            read straight into that layout (each process reads only its shards).
        """
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        checked = (self.directory / str(step) / "checksums").exists()  # not before checksums
        if checked:
            items["checksums"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if checked:
            # tensorstore reads a garbled chunk of a data file without an error when it still
            # decodes; the checksums saved with the state catch it.
            got, want = state_checksums(restored["state"]), restored["checksums"]
            wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            if wrong:
                raise ChecksumError(
                    f"{len(wrong)} array(s) differ from their saved checksums: "
                    f"{', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}"
                )
        data_state = restored["data"]
        if set(data_state) == {"value"}:
            # Checkpoints before the fault work wrapped the iterator state as {"value": state}.
            data_state = data_state["value"]
        return restored["state"], data_state

    def restore_latest(
        self, abstract_state, log, *, check_data=lambda data_state: None
    ) -> tuple[int, object, dict] | None:
        """`(step, state, data_state)` of the newest checkpoint that restores completely.

        Each newer one that does not (`check_data(data_state)` raising counts too; it may apply
        the state, as it is called last on the one returned) is moved to
        `<directory>.set_aside/<step>`, never deleted, and `log` gets one line naming it and what
        was wrong. None when no checkpoint is left.

        Raises:
          UserError: a checkpoint holds a state of another shape (another model or optimizer
            setting): the workdir belongs to another run; nothing is moved.
        """
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
                check_data(data_state)
            except Exception as e:
                # The other reads of a failed restore keep running in tensorstore and post their
                # results onto orbax's closed event loop, each printing an 'Event loop is closed'
                # traceback; let them land now, while the command line's filter drops them,
                # rather than at exit.
                time.sleep(RESTORE_DRAIN_S)
                self._raise_if_other_model(step, abstract_state)
                moved = self._set_aside(step)
                log(
                    f"checkpoint {self.directory / str(step)} is unreadable ({describe(e)}); "
                    f"moved to {moved}, trying the previous one"
                )
                continue
            return step, state, data_state
        return None

    def _raise_if_other_model(self, step: int, abstract_state) -> None:
        path = self.directory / str(step) / "state"
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = _shapes(reader.metadata(path).item_metadata)
        except Exception:
            saved = {}
        if not saved:
            return  # unreadable (orbax may return an empty tree): corrupt, not another model
        difference = _difference(saved, _shapes(abstract_state))
        if difference:
            raise UserError(
                f"{self.directory.parent} holds a run of another model or optimizer setting "
                f"(checkpoint {step} differs from the config: {difference}); "
                "use a new --workdir, or the config that run was started with"
            )

    def _set_aside(self, step: int) -> pathlib.Path:
        """Moves checkpoint `step` out of orbax's sight; returns where it went."""
        target = self.directory.with_name(self.directory.name + ".set_aside") / str(step)
        n = 1
        while target.exists():
            target = target.with_name(f"{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), target)
        if jax.process_count() > 1:  # every process lists the steps after the move
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; raises `CheckpointSaveError`."""
        self.check(block=True)

    def close(self) -> None:
        """Waits for a running save (its errors are left to `check`/`wait`) and releases orbax."""
        for _ in range(2):
            try:
                # After a failed save, orbax's close() re-raises that error before closing
                # anything; the second call (which does not raise it again) closes.
                self._manager.close()
                return
            except Exception:
                continue


def restore_params(directory: str | pathlib.Path, abstract_params, *, use_ema: bool):
    """Params for evaluation from a training checkpoint or from a converted one.

    Accepted layouts:
      - a training workdir or its `checkpoints/` folder: the latest step's `state/params` (or
        `state/ema` when `use_ema`);
      - a converted checkpoint (`vig_jax.convert`): a folder with `model.json` and an orbax
        params tree in `params/`.

    Nothing is written: a missing path stays missing.

    Args:
      abstract_params: pytree of `jax.ShapeDtypeStruct` (with shardings) like the model's params.
    Raises:
      UserError: no checkpoint at `directory`, or it cannot be read into `abstract_params`.
    """
    path = pathlib.Path(directory).absolute()
    if not path.is_dir():
        raise UserError(f"checkpoint {path} not found")
    if (path / "model.json").exists():
        try:
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(path / "params", abstract_params), None
        except Exception as e:
            raise UserError(f"cannot read converted checkpoint {path}: {describe(e)}") from e
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(path, options=options) as manager:
        step = manager.latest_step()
        if step is None:
            raise UserError(
                f"no checkpoint in {path}: expected a training workdir, its checkpoints/ folder, "
                "or a converted checkpoint folder with model.json and params/"
            )
        # Only the params (or the EMA) are read; the rest of the saved state is skipped.
        name = "ema" if use_ema else "params"
        target = {name: abstract_params}
        restore_args = jax.tree_util.tree_map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target
        )
        args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:
            raise UserError(
                f"cannot read state/{name} of checkpoint {path / str(step)}"
                + (" (was it trained with optimizer.ema_decay > 0?)" if use_ema else "")
                + f": {describe(e)}"
            ) from e
        return restored["state"][name], step


def read_model_json(directory: str | pathlib.Path) -> dict | None:
    """The `model.json` of a converted checkpoint, or None for a training checkpoint."""
    path = pathlib.Path(directory) / "model.json"
    return json.loads(path.read_text()) if path.exists() else None


def save_converted(
    directory: str | pathlib.Path, params: dict, info: dict, *, overwrite: bool = False
) -> None:
    """Writes a converted checkpoint: `params/` (orbax) and `model.json` (`info`).

    Raises:
      FileExistsError: `directory` already holds one and `overwrite` is False.
    """
    directory = pathlib.Path(directory).resolve()
    existing = [p for p in (directory / "params", directory / "model.json") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds a converted checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params, force=overwrite)
        checkpointer.wait_until_finished()
    (directory / "model.json").write_text(json.dumps(info, indent=1) + "\n")


def load_converted(directory: str | pathlib.Path) -> dict:
    """The params tree of a converted checkpoint as saved (host arrays, no shardings)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(directory).resolve() / "params")


def _is_array_metadata(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def read_saved_params(directory: str | pathlib.Path) -> tuple[dict, dict]:
    """The params of a training or converted checkpoint as saved, whatever their shapes.

    Reads the layouts `restore_params` reads; the arrays land unsharded on the first
    local device. Unlike `restore_params` it needs no target shapes: the caller compares them.

    Returns:
      (params, source): source is {"kind": "converted", "model": name, "num_classes": n, ...} or
      {"kind": "training", "step": s}, plus "path" (the folder read).
    Raises:
      FileNotFoundError: no checkpoint there.
    """
    path = pathlib.Path(directory).absolute()
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target_and_args(metadata):
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata, is_leaf=_is_array_metadata
        )
        args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=single), target)
        return target, args

    info = read_model_json(path)
    if info is not None:
        with ocp.PyTreeCheckpointer() as reader:
            target, args = target_and_args(reader.metadata(path / "params").item_metadata.tree)
            params = reader.restore(
                path / "params", args=ocp.args.PyTreeRestore(item=target, restore_args=args)
            )
        return params, {"kind": "converted", **info, "path": str(path)}
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    missing = FileNotFoundError(
        f"no checkpoint at {path}: expected a training workdir, its checkpoints/ folder, or a "
        "converted checkpoint folder with model.json and params/"
    )
    if not path.is_dir():
        raise missing
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(path, options=options, item_handlers=handlers) as manager:
        step = manager.latest_step()
        if step is None:
            raise missing
        metadata = manager.item_metadata(step)["state"].tree
        # Only the params are read; the optimizer state and the EMA are skipped.
        target, args = target_and_args({"params": metadata["params"]})
        restore = ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=restore))
    return restored["state"]["params"], {"kind": "training", "step": step, "path": str(path)}
