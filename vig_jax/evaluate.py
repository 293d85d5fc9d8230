"""Evaluates a trained or converted checkpoint on the config's eval split (top-1, top-5, loss).

    python -m vig_jax.evaluate --config configs/vig_s.py --checkpoint /tmp/vig_s
    python -m vig_jax.evaluate --config configs/vig_s.py --checkpoint /tmp/vig_s_converted

`--checkpoint` is a training workdir (or its checkpoints/ folder: the latest step is used; --ema
evaluates the EMA params) or a converted checkpoint from `vig_jax.convert` (a folder holding
`params/` and `model.json`; its model name must equal `config.model.name`). Prints one JSON line.
Data, batch size and eval transform come from the config (`--config.data.*` overrides them).
Errors are one line with exit code 2 (`--verbose` adds the traceback).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vig_jax.train import cli
from vig_jax.train.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or converted folder")
_EMA = flags.DEFINE_bool("ema", False, "evaluate the EMA params of a training checkpoint")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first")
flags.mark_flags_as_required(["config", "checkpoint"])


def evaluate_checkpoint(config, checkpoint: str, *, use_ema: bool) -> dict:
    """{"step", "eval/loss", "eval/top1", "eval/top5"} of `checkpoint` under `config`.

    The config is checked and the model built as for training (`trainer.plan_run`).

    Raises:
      UserError: a bad config field, no checkpoint at `checkpoint` (nothing is created there), a
        converted checkpoint for another model or class count, or --ema on a converted one.
    """
    from vig_jax.train import checkpoint as ckpt
    from vig_jax.train import loop, sharding
    from vig_jax.train.trainer import plan_run

    plan = plan_run(config, sharding.make_mesh())
    converted = ckpt.read_model_json(checkpoint)
    if converted is not None:
        if use_ema:
            raise UserError("--ema applies to training checkpoints; a converted one has no EMA")
        want = (config.model.name, plan.num_classes)
        got = (converted["model"], converted["num_classes"])
        if got != want:
            raise UserError(f"converted checkpoint is (model, classes) {got}, config has {want}")
    abstract = plan.trainer.abstract_state.params
    params, step = ckpt.restore_params(checkpoint, abstract, use_ema=use_ema)
    metrics = loop.evaluate(plan.trainer, params, config)
    return {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}


def main(argv):
    if len(argv) > 1:
        cli.fail(f"error: unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    result = evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, use_ema=_EMA.value)
    if jax.process_index() == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    app.run(cli.guard(main), flags_parser=cli.parse_flags)
