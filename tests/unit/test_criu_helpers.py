"""The CRIU driver's pure parts: which criu, error lines from its log, --cgroup-root, the CLI's aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzpkg.cli.vzctl import _unalias
from vzpkg.errors import CriuUnavailableError
from vzpkg.runtime import criu
from vzpkg.runtime.checkpoint import _frozen_seconds


def test_last_errors_skips_noise_and_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("(00.01) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n"
                   "(00.02) mnt: fine\n"
                   "(00.03) Error (criu/files.c:1): Can't dump fd 5\n"
                   "(00.04) Error (criu/cr-dump.c:1975): Dumping FAILED.\n")
    assert criu.last_errors(log) == "Error (criu/files.c:1): Can't dump fd 5 | Error (criu/cr-dump.c:1975): Dumping FAILED."
    assert criu.last_errors(tmp_path / "missing.log") == "no log written"


def test_frozen_time_from_the_log(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    log.write_text("(00.010) start\n(00.065) Seized task 1, state 1\n(00.070) Seized task 2, state 1\n"
                   "(00.402) Running post-dump scripts\n(00.402500) \tUnseizing 1 into 2\n(00.425) Dumping finished\n")
    assert _frozen_seconds(log, 9.0) == pytest.approx(0.3375)
    log.write_text("nothing\n")
    assert _frozen_seconds(log, 9.0) == 9.0


def test_find_refuses_an_old_or_missing_criu(monkeypatch) -> None:
    monkeypatch.setenv("VZ_CRIU", "/bin/true")  # prints no version
    with pytest.raises(CriuUnavailableError, match="make criu"):
        criu.find()
    monkeypatch.setenv("VZ_CRIU", "/nonexistent/criu")
    with pytest.raises(CriuUnavailableError, match="missing"):
        criu.find()


def test_cgroup_root_per_v1_controller() -> None:
    args = criu.cgroup_root_args("/vzpkg/abc-1")
    assert args[0] == "--cgroup-root" and all(a.endswith("/vzpkg/abc-1") for a in args[1::2])
    assert not any(a.startswith("name=") for a in args[1::2])  # named hierarchies keep the image's path


def test_aliases() -> None:
    assert _unalias(["--root", "/r", "suspend", "101"]) == ["--root", "/r", "chkpnt", "101"]
    assert _unalias(["resume", "101", "--dumpdir", "suspend"]) == ["restore", "101", "--dumpdir", "suspend"]
