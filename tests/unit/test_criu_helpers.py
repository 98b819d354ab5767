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


def test_the_config_file_criu_reads_is_vzpkgs() -> None:
    from vzpkg.config import DEFAULT_CONFIG_FILE

    assert Path(criu.CONFIG_FILE) == DEFAULT_CONFIG_FILE


def _fake_criu(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_version_is_asked_once_then_remembered(tmp_path: Path, monkeypatch) -> None:
    """criu --version runs once per binary (per process; across processes through KDAT_DIR when root owns it),
    and again when the binary changes."""
    calls = tmp_path / "calls"
    fake = _fake_criu(tmp_path / "criu", f'echo x >> {calls}\necho "Version: 4.2.1"\n')
    monkeypatch.setattr(criu, "KDAT_DIR", tmp_path / "kdat")
    monkeypatch.setattr(criu, "_versions", {})
    assert criu.version_of(fake) == (4, 2, 1)
    assert criu.version_of(fake) == (4, 2, 1)
    assert calls.read_text().count("x") == 1
    criu._versions.clear()  # a new process
    assert criu.version_of(fake) == (4, 2, 1)
    import os

    assert calls.read_text().count("x") == (1 if os.geteuid() == 0 else 2)
    fake = _fake_criu(tmp_path / "criu", f'echo x >> {calls}\necho "Version: 4.3"\n# changed\n')
    assert criu.version_of(fake) == (4, 3)


def test_run_returns_when_criu_exits_and_kills_it_at_the_timeout(tmp_path: Path) -> None:
    """A blocking wait: Popen.wait(timeout=) polled with sleeps up to 50 ms, so a 70 ms criu took 113 ms."""
    import time

    fake = _fake_criu(tmp_path / "criu", "exec sleep 0.07\n")
    # The best of up to five runs: a loaded machine can delay one run's start or end by tens of ms (1 in 50 ran
    # past 105 ms with both CPUs busy), but the polling wait can never come in under 105 ms (its sleeps, 0.5 ms
    # doubling to 50 ms, look at 63.5 ms and next at 113.5 ms).
    runs = []
    for i in range(5):
        runs.append(criu.run(fake, [], tmp_path / f"a{i}.log"))
        if runs[-1][1] < 0.105:
            break
    assert all(ok and took >= 0.07 for ok, took in runs), runs
    assert runs[-1][1] < 0.105, runs
    fake = _fake_criu(tmp_path / "criu", "exec sleep 30\n")
    t0 = time.monotonic()
    ok, took = criu.run(fake, [], tmp_path / "b.log", timeout=0.3)
    assert not ok and time.monotonic() - t0 < 5


def _mi(point: str, fstype: str, opts: str) -> str:
    return f"30 25 0:26 / {point} rw,nosuid - {fstype} {fstype} {opts}\n"


def test_cgroup_yard_only_where_the_host_is_laid_out_as_criu_wants() -> None:
    """--cgroup-yard /sys/fs/cgroup (CRIU then mounts no yard of its own) only when every hierarchy is there,
    named by CRIU's convention: systemd's v1/hybrid layouts yes, comounted controllers too; pure v2 no."""
    hybrid = (_mi("/sys/fs/cgroup", "tmpfs", "mode=755") + _mi("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")
              + _mi("/sys/fs/cgroup/memory", "cgroup", "rw,memory") + _mi("/sys/fs/cgroup/systemd", "cgroup",
                                                                         "rw,xattr,name=systemd")
              + _mi("/sys/fs/cgroup/unified", "cgroup2", "rw,nsdelegate"))
    cg = "4:name=systemd:/\n3:memory:/x\n2:cpu,cpuacct:/\n0::/\n"
    assert criu.yard_matches(hybrid, cg)
    assert not criu.yard_matches(hybrid, cg + "5:pids:/\n")  # a hierarchy mounted elsewhere (or not at all)
    assert not criu.yard_matches(hybrid.replace("/sys/fs/cgroup/memory", "/cg/memory"), cg)
    pure_v2 = _mi("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate")
    assert not criu.yard_matches(pure_v2, "0::/user.slice\n")
    assert not criu.yard_matches(hybrid, "")
