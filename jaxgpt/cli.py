"""What every script shares: user mistakes become one stderr line and exit 2."""
from __future__ import annotations

import sys
from collections.abc import Callable

from jaxgpt.errors import Interrupted, UserError


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Call main(argv); a UserError prints `error: ...` (traceback only with --debug) and exits 2."""
    import absl.logging  # orbax logs routine notices as absl warnings; keep the terminal for our output
    absl.logging.set_verbosity(absl.logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
