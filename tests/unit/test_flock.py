"""vzpkg/flock.py: the flock helper every lock file goes through."""

from __future__ import annotations

import fcntl
import os
import stat

from vzpkg.flock import lock_file, open_lockfile, take


def test_lock_file_creates_parents_with_the_given_mode_and_is_close_on_exec(tmp_path):
    path = tmp_path / "a" / "b.lock"
    fd = lock_file(path, dir_mode=0o700)
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


def test_take_without_wait_reports_a_held_lock_and_shared_holders_coexist(tmp_path):
    path = tmp_path / "x.lock"
    held = lock_file(path)  # exclusive
    other = open_lockfile(path)
    try:
        assert not take(other, wait=False) and not take(other, shared=True, wait=False)
        os.close(held)
        held = lock_file(path, shared=True)
        assert take(other, shared=True, wait=False)  # a second shared holder
        third = open_lockfile(path)
        assert not take(third, wait=False)  # but no exclusive one while they hold it
        os.close(third)
    finally:
        os.close(held)
        os.close(other)


def test_truncate_flag_empties_the_file(tmp_path):
    path = tmp_path / "r"
    path.write_text("524288\n")
    fd = lock_file(path, flags=os.O_RDWR | os.O_TRUNC)
    os.close(fd)
    assert path.read_text() == ""
