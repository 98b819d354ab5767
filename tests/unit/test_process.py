"""vzpkg/process.py: the one way vzpkg runs external commands."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vzpkg import process
from vzpkg.errors import BuildError, ScriptError, VEError

PACKAGE = Path(__file__).resolve().parents[2] / "vzpkg"
#: files allowed to use subprocess (documented in vzpkg/process.py's docstring): only the process layer itself
ALLOWED = {"process.py"}
_OS_SPAWNERS = {"system", "popen", "spawnl", "spawnlp", "spawnv", "spawnvp", "posix_spawn", "posix_spawnp"}


def subprocess_uses(source: str) -> list[int]:
    """Line numbers of SOURCE that import subprocess, use it, or run a command through os.system and friends
    (the syntax tree, not the text: docstrings and comments that mention them do not count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "subprocess" for a in node.names):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "subprocess":
            found.append(node.lineno)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                node.value.id == "subprocess" or (node.value.id == "os" and node.attr in _OS_SPAWNERS)):
            found.append(node.lineno)
    return sorted(found)


def test_nothing_outside_the_process_module_uses_subprocess() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        source = path.read_text()
        lines = source.splitlines()
        offenders += [f"vzpkg/{rel}:{n}: {lines[n - 1].strip()}" for n in subprocess_uses(source)]
    assert offenders == [], "run external commands through vzpkg.process:\n" + "\n".join(offenders)


def test_the_scan_finds_direct_calls() -> None:
    assert subprocess_uses("def f():\n    import subprocess\n    subprocess.run(['x'])\n") == [2, 3]
    assert subprocess_uses("from subprocess import run\n") == [1]
    assert subprocess_uses("import os\nos.system('x')\n") == [2]
    assert subprocess_uses('"""subprocess.run and os.system in a docstring"""\nfrom . import process\n') == []


def test_capture_returns_output() -> None:
    r = process.run(["sh", "-c", "echo out; echo err >&2"], capture=True, text=True)
    assert (r.returncode, r.stdout, r.stderr, r.tail) == (0, "out\n", "err\n", ["err"])


def test_input_reaches_the_command() -> None:
    assert process.run(["cat"], input=b"abc", capture=True).stdout == b"abc"


def test_failure_is_one_line_naming_command_status_and_last_lines() -> None:
    with pytest.raises(ScriptError) as e:
        process.run(["sh", "-c", "echo 1; echo 2; echo 3 >&2; echo 4; exit 3"], error=ScriptError)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("sh -c ") and "failed (exit status 3): 2 | 3 | 4" in msg
    assert e.value.exit_code == ScriptError.exit_code


def test_what_and_hint_name_the_step() -> None:
    with pytest.raises(VEError, match=r"^copying x failed \(exit status 1\); see the log$"):
        process.run(["false"], error=VEError, what="copying x", hint="see the log")


def test_killed_by_a_signal_is_said_so() -> None:
    with pytest.raises(BuildError, match="killed by signal 9"):
        process.run(["sh", "-c", "kill -9 $$"])


def test_unchecked_failure_returns_the_status() -> None:
    r = process.run(["sh", "-c", "echo why >&2; exit 4"], capture=True, check=False)
    assert r.returncode == 4 and r.tail == ["why"]


def test_a_missing_program_is_the_callers_error() -> None:
    with pytest.raises(VEError, match="cannot run /no/such/tool: No such file or directory"):
        process.run(["/no/such/tool"], error=VEError)


def test_streamed_lines_go_to_log_and_callback(tmp_path: Path) -> None:
    seen: list[bytes] = []
    with (tmp_path / "log").open("wb") as log:
        r = process.run(["sh", "-c", "echo a; echo b >&2"], log=log, on_line=seen.append)
    assert (tmp_path / "log").read_bytes() == b"a\nb\n"
    assert seen == [b"a\n", b"b\n"] and r.tail == ["a", "b"]


def test_tail_is_bounded() -> None:
    r = process.run(["seq", "1", "10000"])
    assert len(r.tail) == process.TAIL_KEPT and r.tail[-1] == "10000"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg"
    start = time.monotonic()
    with pytest.raises(BuildError, match=r"did not finish within 0.5 s and was killed: started"):
        process.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; wait"], timeout=0.5)
    assert time.monotonic() - start < 5
    # no waiting here: the error goes on only once the group has stopped (a signalled process dies when it next
    # runs, which on a loaded machine is after its leader was reaped; the process layer waits for that)
    assert not _alive(int(pidfile.read_text())), "the command's background child outlived the timeout"


def test_own_process_group_and_no_inherited_fds() -> None:
    r_fd, w_fd = os.pipe()
    os.set_inheritable(w_fd, True)
    try:
        out = process.run(["sh", "-c", f"ps -o pgid= -p $$; ls /proc/self/fd | grep -cx {w_fd} || true"],
                          capture=True, text=True).stdout.split()
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert int(out[0]) != os.getpgrp()
    assert out[1] == "0", "a descriptor of vzpkg leaked into the command"


def test_parent_death_signal_reaches_the_command(tmp_path: Path) -> None:
    """A SIGKILLed vzpkg: the command it ran gets the parent-death signal and ends."""
    pidfile = tmp_path / "pid"
    driver = ("from vzpkg import process\n"
              f"process.run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 60'])\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=PACKAGE.parent)
    try:
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_interrupt_stops_the_group(tmp_path: Path) -> None:
    """KeyboardInterrupt while a command runs: its group is stopped before the exception goes on."""
    pidfile = tmp_path / "bg"

    def on_line(raw: bytes) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        process.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo go; wait"], on_line=on_line)
    assert not _alive(int(pidfile.read_text()))


def test_interrupt_lets_the_group_finish_its_cleanup(tmp_path: Path) -> None:
    """A member of the group that cleans up on SIGTERM gets its grace and has finished before the exception goes
    on, although the leader is gone at once (the group is not SIGKILLed as soon as the leader is reaped)."""
    done = tmp_path / "cleaned"
    member = f"trap 'sleep 0.3; echo ok > {done}; exit 0' TERM; echo trap-set; while :; do sleep 0.05; done"

    def on_line(raw: bytes) -> None:
        if raw == b"trap-set\n":  # not before: a SIGTERM ahead of the trap would end the member at once
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        process.run(["sh", "-c", f'sh -c "{member}" & wait'], on_line=on_line)
    assert done.read_text() == "ok\n"
    assert time.monotonic() - start < process._STOP_GRACE


def test_interrupt_stops_a_stopped_member_without_waiting_out_the_grace(tmp_path: Path) -> None:
    """A stopped member acts on SIGTERM only once continued: it gets SIGCONT, not the whole grace then SIGKILL."""
    pidfile = tmp_path / "bg"

    def on_line(raw: bytes) -> None:
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        process.run(["sh", "-c", f"sleep 60 & kill -STOP $!; echo $! > {pidfile}; echo go; wait"], on_line=on_line)
    assert time.monotonic() - start < process._STOP_GRACE / 2
    assert not _alive(int(pidfile.read_text()))


def test_spawn_kills_the_group_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError), process.spawn(["sleep", "60"]) as proc:
        raise RuntimeError
    assert proc.returncode == -signal.SIGKILL
