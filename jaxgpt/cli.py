"""What every script shares: user mistakes become one stderr line and exit 2."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from jaxgpt.errors import Interrupted, UserError


def _show_notices() -> None:
    """jaxgpt's library code reports degradations (an unsupported compiler option, a cache that
    cannot be written) through the `jaxgpt` logger; scripts show each as one stderr line."""
    logger = logging.getLogger("jaxgpt")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("notice: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Call main(argv); a UserError prints `error: ...` (traceback only with --debug) and exits 2."""
    import absl.logging  # orbax logs routine notices as absl warnings; keep the terminal for our output
    absl.logging.set_verbosity(absl.logging.ERROR)
    _show_notices()
    from jaxgpt.paths import configure_gcs
    configure_gcs()  # STORAGE_EMULATOR_HOST -> every Cloud Storage client; quiet clients
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


def add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile_cache", default="", metavar="PATH|off",
                        help="JAX's persistent compilation cache: a folder, or off (default: ~/.cache/jaxgpt/xla, "
                             "under $XDG_CACHE_HOME when set)")


def apply_compile_cache(setting: str) -> None:
    from jaxgpt.platform import use_compile_cache
    use_compile_cache(setting)
