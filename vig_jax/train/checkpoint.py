"""Orbax checkpoints of the train state and the data iterator; the only module importing orbax.

A checkpoint at step s holds `state/` (the whole TrainState: params, opt_state, ema, key, step)
and `data/` (the data iterator state as JSON), so a restored run continues exactly where the saved
one was. Saves are asynchronous: the arrays are copied off the device, then written in a thread
while training continues; orbax only makes a step directory visible once it is complete, so a
SIGKILL mid-write leaves the previous checkpoint as the latest.
"""

import json
import pathlib

import jax
import orbax.checkpoint as ocp


def _encode_data_state(data_state):
    # grain iterators report their state as JSON bytes; JsonSave wants JSON-able objects.
    if isinstance(data_state, bytes):
        return {"bytes": data_state.decode("utf-8")}
    return {"value": data_state}


def _decode_data_state(saved):
    return saved["bytes"].encode("utf-8") if "bytes" in saved else saved["value"]


class Checkpointer:
    """Saves and restores (TrainState, data iterator state) pairs under `directory`.

    Args:
      directory: checkpoint root (created if missing); one subdirectory per step.
      keep: how many of the most recent checkpoints to keep.
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state, data_state) -> None:
        """Starts an asynchronous save of `state` and `data_state` at `step`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state):
        """Restores `(state, data_state)` saved at `step`.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set: the arrays are
            read straight into that layout (each process reads only its shards).
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], _decode_data_state(restored["data"])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def restore_params(directory: str | pathlib.Path, abstract_params, *, use_ema: bool):
    """Params for evaluation from a training checkpoint or from a converted one.

    Accepted layouts:
      - a training workdir or its `checkpoints/` folder: the latest step's `state/params` (or
        `state/ema` when `use_ema`);
      - a converted checkpoint (`vig_jax.convert`): a folder with `model.json` and an orbax
        params tree in `params/`.

    Args:
      abstract_params: pytree of `jax.ShapeDtypeStruct` (with shardings) like the model's params.
    """
    path = pathlib.Path(directory).absolute()
    if (path / "model.json").exists():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path / "params", abstract_params), None
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    with ocp.CheckpointManager(path) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(
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
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(
                f"cannot read state/{name} of checkpoint {path}/{step}"
                + (" (was it trained with optimizer.ema_decay > 0?)" if use_ema else "")
                + f": {e}"
            ) from e
        return restored["state"][name], step


def read_model_json(directory: str | pathlib.Path) -> dict | None:
    """The `model.json` of a converted checkpoint, or None for a training checkpoint."""
    path = pathlib.Path(directory) / "model.json"
    return json.loads(path.read_text()) if path.exists() else None


def save_converted(directory: str | pathlib.Path, params: dict, info: dict) -> None:
    """Writes a converted checkpoint: `params/` (orbax) and `model.json` (`info`)."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params)
        checkpointer.wait_until_finished()
    (directory / "model.json").write_text(json.dumps(info, indent=1) + "\n")


def load_converted(directory: str | pathlib.Path) -> dict:
    """The params tree of a converted checkpoint as saved (host arrays, no shardings)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(directory).resolve() / "params")
