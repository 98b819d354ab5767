#!/usr/bin/env python3
"""Run every benchmark in bench/ (bench_*.py, in name order) with this Python; `make bench` calls it.

    python bench/run.py              # all benchmarks, each with its default options
    python bench/run.py cache        # only bench_cache.py (names without the bench_ prefix and .py suffix)

Each script prints its own table; the exit status is non-zero when any of them fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if argv:
        wanted = {name.removeprefix("bench_").removesuffix(".py") for name in argv}
        unknown = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            sys.exit(f"run.py: no benchmark named {sorted(unknown)[0]!r} in {BENCH_DIR}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    failed = []
    for script in scripts:
        print(f"==> {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
