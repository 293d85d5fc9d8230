"""Trains a ViG: `python train.py --config configs/vig_s.py --workdir /tmp/vig_s`.

Any config field can be overridden, e.g. `--config.data.batch_size=256`; a misspelt field, a wrong
type or a value out of range stops before anything starts, with one line (`--verbose` or
`VIG_VERBOSE=1` adds the traceback). Rerunning the same command resumes from the newest good
checkpoint in --workdir. Multi-host: start the same command on every host with --distributed.

Exit codes (docs/faults.md): 0 done, 2 user error, 3 non-finite loss, 4 checkpoint save failed,
75 stopped by SIGTERM/SIGINT after saving (rerun to resume).
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vig_jax.train import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, tensorboard/")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "call jax.distributed.initialize() first: one process per host; coordinator, process count "
    "and id are auto-detected from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU)",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        cli.fail(f"error: unexpected arguments: {argv[1:]}")
    # orbax logs every checkpoint phase at INFO; the progress bar and metrics say what matters.
    logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if not jax.config.jax_compilation_cache_dir:
        # Compiling is slow (the first ViG-H step with the Pallas kernels took ~2 min on an H100,
        # mostly Triton): cache the programs in the workdir so that a resumed run starts at once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, "jax_cache"))
    from vig_jax.train import loop  # after initialize(): nothing may touch devices before it

    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(cli.guard(main), flags_parser=cli.parse_flags)
