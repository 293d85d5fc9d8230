"""Command-line plumbing of `train.py` and `vig_jax.evaluate`: flags, one-line errors, exit codes.

    app.run(cli.guard(main), flags_parser=cli.parse_flags)

`parse_flags` checks every `--config.<field>` override against the config file before absl applies
them, so a misspelt field is one line naming it (and the closest existing field) instead of an
error from deep inside ml_collections. `guard` prints a `RunError` (`vig_jax.train.errors`) as one
line and exits with its code; `--verbose` or `VIG_VERBOSE=1` adds the traceback (and orbax's own
log lines, which otherwise repeat the error at length).
"""

import difflib
import functools
import importlib.util
import logging
import os
import sys
import traceback

import ml_collections
from absl import flags

from vig_jax.train.errors import EXIT_USER_ERROR, RunError, UserError

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "print tracebacks and library logs with errors (also: VIG_VERBOSE=1)"
)


def verbose(argv: list[str] | None = None) -> bool:
    """Whether to show tracebacks: `--verbose` (in `argv`, before flags are parsed) or env."""
    if os.environ.get("VIG_VERBOSE", "") not in ("", "0"):
        return True
    if argv is not None:
        return "--verbose" in argv
    return flags.FLAGS.is_parsed() and _VERBOSE.value


def fail(message: str, code: int = EXIT_USER_ERROR):
    """Prints `message` as one line on stderr and exits with `code`."""
    print(message, file=sys.stderr)
    sys.exit(code)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of the last `--name=v` or `--name v` in `argv` (absl's rule: the last wins)."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (`file.py` or `file.py:arg`), as config_flags calls it."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        fail(f"error: config file {file} not found")
    spec = importlib.util.spec_from_file_location("_vig_config_check", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        if verbose(sys.argv):
            raise
        fail(f"error: config file {path} failed to load: {type(e).__name__}: {e}")


def check_config_overrides(argv: list[str]) -> None:
    """Exits with one line if the config file is missing or fails to load, or if a `--config.a.b`
    flag names no field of it."""
    path = _flag_value(argv, "config")
    if path is None:
        return  # absl reports the missing required flag
    config = _load_config(path)
    for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        for prefix in ("--config.", "--noconfig."):
            if name.startswith(prefix):
                break
        else:
            continue
        node, fields = config, name[len(prefix) :].split(".")
        for i, field in enumerate(fields):
            if not isinstance(node, ml_collections.ConfigDict) or field not in node:
                known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(field, known, n=1)
                hint = f' Did you mean "{close[0]}"?' if close else ""
                fail(f"error: unknown config field {'.'.join(fields[: i + 1])!r} in {name}.{hint}")
            node = node[field]


def parse_flags(argv: list[str]) -> list[str]:
    """Use as `absl.app.run(main, flags_parser=parse_flags)`; exits with a message on bad flags."""
    check_config_overrides(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"error: {e} (--helpshort or --helpfull list the flags)")
    except Exception as e:  # e.g. a config override of the wrong structure
        if verbose(argv):
            raise
        fail(f"error: bad flags: {type(e).__name__}: {e}")


class _DropOrbaxLogs(logging.Filter):
    """Orbax logs a failed save or restore with its traceback before raising it to us."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def _drop_closed_loop_errors(hook):
    """`sys.excepthook` without the 'Event loop is closed' errors that tensorstore prints (through
    this hook) for each read still in flight when an orbax restore failed: the failure itself is
    reported once, as a line naming the checkpoint."""

    def excepthook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        hook(kind, value, tb)

    return excepthook


def guard(main):
    """`main` with `RunError`s printed as one line and turned into their exit codes."""

    @functools.wraps(main)
    def run(argv):
        if not verbose():
            logging.getLogger("absl").addFilter(_DropOrbaxLogs())
            sys.excepthook = _drop_closed_loop_errors(sys.excepthook)
        try:
            return main(argv)
        except RunError as e:
            if verbose():
                traceback.print_exc()
            label = "error" if isinstance(e, UserError) else type(e).__name__
            fail(f"{label}: {e}", e.exit_code)

    return run
