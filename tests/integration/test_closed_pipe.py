"""`vzctl status --json | head -c 10`, `vzlist | head -1`, `vzpkg list | head -1`: when the reader of the output
goes away, every command exits as other Unix tools do: silently, status 141 (128 + SIGPIPE) — no "Broken pipe"
error, no traceback, no "Exception ignored" at exit (vzpkg/cli/plain.py, the entry points of all three)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]

COMMANDS = [
    ("vzctl", "status", "101", "--json"),
    ("vzctl", "status", "101"),
    ("vzctl", "--help"),
    ("vzlist", "-a"),
    ("vzlist", "-a", "--json"),
    ("vzpkg", "list"),
    ("vzpkg", "list", "--json"),
    ("vzpkg", "info", "debian-12-x86_64"),
    ("vzpkg", "validate"),
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VZ_ROOT": str(tmp_path / "vz"), "VZPKG_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": str(PROJECT)}


def _argv(cmd: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", f"vzpkg.cli.{cmd[0]}", *cmd[1:]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_output_to_a_pipe_nobody_reads(cmd, tmp_path):
    """The pipe's read end is closed before the command starts: its first write fails, every time."""
    (tmp_path / "cache").mkdir()
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(_argv(cmd), stdout=w, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                           cwd=PROJECT, timeout=60)
    finally:
        os.close(w)
    # (argparse's help output from Python 3.13 on ignores a write error itself: silent too, but exit 0)
    codes = (0, 141) if "--help" in cmd and sys.version_info >= (3, 13) else (141,)
    assert p.returncode in codes and p.stderr == "", (p.returncode, p.stderr)
    # the same command with a reader: it has output (the pipe above was written to) and succeeds
    ok = subprocess.run(_argv(cmd), capture_output=True, text=True, env=_env(tmp_path), cwd=PROJECT, timeout=60)
    assert ok.returncode == 0 and ok.stdout and ok.stderr == "", ok


@pytest.mark.parametrize("cmd", COMMANDS[:1] + COMMANDS[3:4] + COMMANDS[5:6], ids=" ".join)
def test_head_in_a_shell(cmd, tmp_path):
    """As a user types it: `... | head -c 10` in bash. Whether the command writes before or after head exits is a
    race: 0 or 141, and never a word on stderr."""
    (tmp_path / "cache").mkdir()
    line = " ".join(_argv(cmd)) + " 2>err | head -c 10; echo; echo ${PIPESTATUS[0]}"
    p = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path,
                       timeout=60)
    assert p.stdout.splitlines()[-1] in ("0", "141"), p.stdout
    assert (tmp_path / "err").read_text() == ""


def test_a_broken_pipe_to_something_else_is_still_an_error():
    """Only the output's reader going away is quiet: a pipe to a child of ours that went away is an error."""
    code = ("import os\nfrom vzpkg.cli.plain import run_main\n"
            "def run(argv):\n    r, w = os.pipe()\n    os.close(r)\n    os.write(w, b'x')\n"
            "run_main('vzctl', run, [])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT,
                       env={**os.environ, "PYTHONPATH": str(PROJECT)}, timeout=60)
    assert (p.returncode, p.stderr) == (30, "vzctl: error: Broken pipe\n")


def test_closed_or_full_output(tmp_path):
    """`vzctl status X >&-`: the command runs, its output goes nowhere, no error (was an internal error); `>
    /dev/full`: one line, the disk-full exit code 15 (was a second report at exit and status 120)."""
    (tmp_path / "cache").mkdir()
    argv = _argv(("vzctl", "status", "101"))
    closed = subprocess.run(["bash", "-c", " ".join(argv) + " >&-"], capture_output=True, text=True,
                            env=_env(tmp_path), cwd=PROJECT, timeout=60)
    assert (closed.returncode, closed.stderr) == (0, "")
    with open("/dev/full", "w") as full:
        p = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=PROJECT,
                           timeout=60)
    assert p.returncode == 15 and p.stderr.count("\n") == 1 and p.stderr.startswith("vzctl: error: "), p.stderr
