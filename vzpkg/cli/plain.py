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
        print(f"{prog}: {e.message}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except OSError as e:
        print(f"{prog}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        code = VEError.exit_code
    sys.exit(code)
