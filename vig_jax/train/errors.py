"""The errors a run stops with, and the exit code of each (docs/faults.md has the full table).

`train.py`, `vig_jax.evaluate` and `vig_jax.convert` print these as one line (the traceback with
`--verbose` or `VIG_VERBOSE=1`) and exit with their `exit_code`; anything else is a bug and keeps
its traceback (exit 1).
"""

EXIT_DONE = 0
EXIT_BUG = 1  # an unexpected exception: the traceback is printed
EXIT_USER_ERROR = 2  # bad flags or config, data not prepared, workdir in use or of another model
EXIT_NONFINITE = 3  # the loss became NaN/Inf; the last good checkpoint is kept
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (disk full, read-only, stalled storage)
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was saved; rerun the same command to resume


class RunError(Exception):
    """Base of the errors that stop a run with a one-line message and `exit_code`."""

    exit_code = EXIT_BUG


class UserError(RunError, ValueError):
    """Something the user can fix: a config field, a flag, a path, the dataset, the workdir."""

    exit_code = EXIT_USER_ERROR


class NonFiniteLossError(RunError, FloatingPointError):
    """The training loss (or gradient) became NaN or Inf; the message names the step."""

    exit_code = EXIT_NONFINITE


class CheckpointSaveError(RunError, OSError):
    """A checkpoint could not be written; the message names its path and the cause."""

    exit_code = EXIT_SAVE_FAILED


class Preempted(RunError):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint (or before the first step)."""

    exit_code = EXIT_PREEMPTED
