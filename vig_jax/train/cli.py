"""Flag parsing for `train.py` and `vig_jax.evaluate`: config overrides fail early and clearly.

`config_flags.DEFINE_config_file(..., lock_config=True)` rejects a wrong type with a clear absl
message, but a misspelt field surfaces as a bare `AttributeError`/`KeyError` traceback from deep
inside ml_collections; here it becomes one line naming the flag (plus ml_collections' hint).
"""

import re
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """Use as `absl.app.run(main, flags_parser=parse_flags)`; exits with a message on bad flags."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help.")
    except (AttributeError, KeyError) as e:
        # ml_collections' message holds the quoted name (quoted once more when re-raised as an
        # AttributeError) and maybe a 'Did you mean "x"' suggestion.
        text = str(e)
        name = re.search(r"[A-Za-z_]\w*", text).group(0)
        suggestion = re.search(r'Did you mean "(\w+)"', text)
        hint = f' Did you mean "{suggestion.group(1)}"?' if suggestion else ""
        culprit = [a for a in argv[1:] if a.startswith("--config.") and f".{name}" in a]
        flag = culprit[0].split("=", 1)[0] if culprit else "a --config.* flag"
        sys.exit(f"FATAL: unknown config field {name!r} in {flag}.{hint}")
