"""Unit checks of the hot path's in-process replacements: the image copy (cp --sparse=always), the config's
temporary names (tempfile.mkstemp's, which leftovers.py recognises), the cgroup join's choice of file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from vzpkg.runtime import attach, conf, leftovers
from vzpkg.runtime.backends import image


def test_copy_sparse_keeps_data_holes_and_mode(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        for off in (0, 5 << 20, (64 << 20) - 8192):
            f.seek(off)
            f.write(os.urandom(4096) + b"x" * 100)
    os.chmod(src, 0o640)
    dst = tmp_path / "dst.img"
    assert image._copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    st = dst.stat()
    assert st.st_size == 64 << 20 and st.st_mode & 0o777 == 0o640
    assert st.st_blocks * 512 < 1 << 20  # the holes stayed holes (about 3 x 8 KiB allocated, not 64 MiB)
    with pytest.raises(FileExistsError):  # never overwrites (O_EXCL)
        image._copy_sparse(src, dst)


def test_config_temporary_names_are_the_ones_leftovers_removes(tmp_path: Path) -> None:
    p = tmp_path / "ve1.conf"
    fd, tmp = conf._mkstemp(p)
    os.close(fd)
    name = os.path.basename(tmp)
    assert leftovers._is_conf_tmp(name, "ve1") and leftovers._conf_tmp_veid(name) == "ve1"
    assert os.stat(tmp).st_mode & 0o777 == 0o600
    fd2, tmp2 = conf._mkstemp(p)
    os.close(fd2)
    assert tmp2 != tmp


def test_join_cgroups_writes_0_to_tasks_where_there_is_one(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for d in (v1, v2):
        d.mkdir()
        (d / "cgroup.procs").write_text("")
    (v1 / "tasks").write_text("")
    pid = os.fork()
    if pid == 0:  # a fresh fork is single-threaded, as the helpers and vzctl are
        try:
            attach.join_cgroups([(str(v1), True), (str(v2), True)])
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    # v1: the calling thread moves itself (no grace period); v2 (no tasks file): the process by its pid
    assert ((v1 / "tasks").read_text(), (v1 / "cgroup.procs").read_text()) == ("0", "")
    assert (v2 / "cgroup.procs").read_text() == str(pid)


def test_join_cgroups_of_a_threaded_process_moves_the_whole_process(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    d.mkdir()
    (d / "cgroup.procs").write_text("")
    (d / "tasks").write_text("")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        attach.join_cgroups([(str(d), True)])  # "0" in tasks would move this thread only
    finally:
        stop.set()
        t.join()
    assert ((d / "tasks").read_text(), (d / "cgroup.procs").read_text()) == ("", str(os.getpid()))
