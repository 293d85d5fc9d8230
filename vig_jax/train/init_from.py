"""Starting a run from other weights: `--config.init_from=PATH` (issue 17, fine-tuning).

`PATH` is a training workdir (or its `checkpoints/` folder: the latest step's params) or a
converted checkpoint (`python -m vig_jax.convert`: `params/` + `model.json`). The run takes those
params with a fresh optimizer state, schedule and step; the loop only calls `initial_state` when
the run's own workdir holds no checkpoint, so an interrupted fine-tune resumes from its own
checkpoint, never from `init_from` again.

What may differ between the saved params and the config's model:
- the class count: the head (`head/kernel`, `head/bias`) is re-initialised, and the log says so
  (`config.reinit_head=True` re-initialises it even when the counts match: a new label set);
- plain ViG's position table: a table learned on another grid (`model.overrides.pos_grid`) is
  resized once to the model's grid with the bicubic resize the model applies at run time
  (`vig_jax.models.pos_embed.resize_pos_embed`), so the fine-tune starts from the function the
  source model computes at the new resolution.
Anything else (missing, unexpected or mis-shaped params, another model's converted checkpoint) is
one `InitFromError` listing every difference, raised before anything is compiled.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vig_jax.models import model_class
from vig_jax.models.pos_embed import resize_pos_embed
from vig_jax.models.vig import ViG
from vig_jax.train.checkpoint import read_saved_params
from vig_jax.train.errors import UserError

HEAD = "head"  # the classifier's top-level name in every model (ViG, ViG-H, DeiT)
POS_EMBED = "pos_embed"


class InitFromError(UserError):
    """Nothing at `init_from`, or its params do not fit the config's model (the message lists
    every misfit)."""


def _flatten(tree) -> dict[str, object]:
    """{"blocks_0/attn/q/kernel": leaf} of a nested-dict pytree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _square_grid(tokens: int) -> int | None:
    side = round(tokens**0.5)
    return side if side * side == tokens else None


def adapt_params(
    saved: dict,
    wanted: dict,
    *,
    model_name: str,
    saved_model: str | None = None,
    reinit_head: bool = False,
) -> tuple[dict[str, jax.Array | None], list[str]]:
    """Fits saved params to the model's param shapes, or lists every misfit.

    Args:
      saved: params as saved (nested dict of arrays).
      wanted: the model's params (nested dict of arrays or `jax.ShapeDtypeStruct`).
      model_name: the config's `model.name`.
      saved_model: the model name a converted checkpoint records (None: not recorded).
      reinit_head: re-initialise the head even when its shape matches.

    Returns:
      ({"path/to/param": array, or None where the fresh initialisation is kept}, notes): one
      entry per param of `wanted`; `notes` says what was re-initialised or resized.
    Raises:
      InitFromError: anything else differs; the message lists every difference.
    """
    have, want = _flatten(saved), _flatten(wanted)
    problems, notes, out = [], [], {}
    if saved_model is not None and saved_model != model_name:
        problems.append(f"model: checkpoint {saved_model!r}, config {model_name!r}")
    head = [k for k in want if k.split("/")[0] == HEAD]
    saved_classes = have.get(f"{HEAD}/bias")
    saved_classes = None if saved_classes is None else saved_classes.shape[-1]
    want_classes = want[f"{HEAD}/bias"].shape[-1] if f"{HEAD}/bias" in want else None
    head_fits = all(k in have and have[k].shape[:-1] == want[k].shape[:-1] for k in head)
    if head and head_fits and (reinit_head or saved_classes != want_classes):
        reason = (
            f"{saved_classes} classes in the checkpoint, {want_classes} in the config"
            if saved_classes != want_classes
            else "config.reinit_head=True"
        )
        notes.append(f"head re-initialised ({reason})")
        out |= dict.fromkeys(head)
        have = {k: v for k, v in have.items() if k not in head}
    pos_w, pos_h = want.get(POS_EMBED), have.get(POS_EMBED)
    if (
        pos_w is not None
        and pos_h is not None
        and model_class(model_name) is ViG
        and pos_w.shape != pos_h.shape
        and pos_w.shape[::2] == pos_h.shape[::2]
        and _square_grid(pos_h.shape[1])
        and _square_grid(pos_w.shape[1])
    ):
        g0, g = _square_grid(pos_h.shape[1]), _square_grid(pos_w.shape[1])
        D = pos_h.shape[-1]
        table = resize_pos_embed(jnp.asarray(pos_h).reshape(g0, g0, D), (g, g))  # [g, g, D]
        have[POS_EMBED] = table.reshape(1, g * g, D)
        notes.append(f"position table resized from {g0}x{g0} to {g}x{g} (bicubic, as at run time)")
    missing = sorted(k for k in want if k not in have and k not in out)
    unexpected = sorted(k for k in have if k not in want)
    shaped = sorted(
        f"{k}: checkpoint {tuple(have[k].shape)}, config {tuple(want[k].shape)}"
        for k in want
        if k in have and have[k].shape != want[k].shape
    )
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shaped)):
        problems += [f"{label}: {item}" for item in items]
    if problems:
        raise InitFromError(
            f"the params do not fit model {model_name!r} ({len(problems)} differences):\n  "
            + "\n  ".join(problems)
        )
    for k, target in want.items():
        if k not in out:
            out[k] = jnp.asarray(have[k], target.dtype)
    return out, notes


def load_params(config, abstract_params: dict) -> tuple[dict[str, jax.Array | None], list[str]]:
    """`adapt_params` of the params at `config.init_from` for the config's model; no compiling.

    Raises:
      InitFromError: nothing at `config.init_from`, or the params do not fit (lists every
        difference); the message starts with the flag.
    """
    try:
        saved, source = read_saved_params(config.init_from)
    except FileNotFoundError as e:
        raise InitFromError(f"--config.init_from={config.init_from}: {e}") from None
    try:
        return adapt_params(
            saved,
            abstract_params,
            model_name=config.model.name,
            saved_model=source.get("model"),
            reinit_head=config.reinit_head,
        )
    except InitFromError as e:
        raise InitFromError(f"--config.init_from={config.init_from}: {e}") from None


def merge(fresh: dict, loaded: dict[str, jax.Array | None]) -> dict:
    """`fresh` (e.g. the initialised params) with every leaf `loaded` holds replaced, each placed
    with the sharding of the leaf it replaces."""

    def pick(path, leaf):
        value = loaded["/".join(str(k.key) for k in path)]
        return leaf if value is None else jax.device_put(value, leaf.sharding)

    return jax.tree_util.tree_map_with_path(pick, fresh)


def fine_tune_key(seed: int) -> jax.Array:
    """The key a run with `init_from` initialises from: PRNGKey(seed) folded with 1. Not the
    key itself, since a source trained briefly with the same seed still carries its initial head
    (and has adapted to it): a head "re-initialised" from that same key would map the new classes
    onto the old ones."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def initial_state(trainer, config, log: Callable[[str], None] = print):
    """The state a run without a checkpoint of its own starts from.

    From scratch (`trainer.init(PRNGKey(config.seed))`), or, with `config.init_from` set, a fresh
    state from `fine_tune_key(config.seed)` (optimizer, step, key, the head when re-initialised)
    carrying the params read from there; `log` gets one line saying where they came from and what
    was adapted.

    Raises:
      InitFromError: see `load_params`; before anything is compiled.
    """
    if config.init_from is None:
        return trainer.init(jax.random.PRNGKey(config.seed))
    loaded, notes = load_params(config, trainer.abstract_state.params)
    state = trainer.init(fine_tune_key(config.seed))
    params = merge(state.params, loaded)
    ema = None if state.ema is None else jax.tree_util.tree_map(jnp.copy, params)
    if jax.process_index() == 0:
        log(f"init_from {config.init_from}" + "".join(f"; {n}" for n in notes))
    return state.replace(params=params, ema=ema)
