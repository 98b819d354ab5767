"""The error handling of the runtime's front ends (vzctl, vzlist), which stay off click for start-up time."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run_main(prog: str, run: Callable[[list[str]], int], argv: list[str] | None) -> NoReturn:
    """Run RUN(argv) and exit with its status; errors become `PROG: message` and their exit code."""
    from vzpkg.errors import VEError, VzError

    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except VzError as e:
        print(f"{prog}: error: {e.message}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except OSError as e:
        print(f"{prog}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        code = VEError.exit_code
    except Exception as e:  # a bug: still one line, never a traceback (VZPKG_DEBUG=1 shows it)
        import os

        if os.environ.get("VZPKG_DEBUG"):
            raise
        print(f"{prog}: error: internal error: {type(e).__name__}: {e} (rerun with VZPKG_DEBUG=1 for details)",
              file=sys.stderr)
        code = VzError.exit_code
    sys.exit(code)
