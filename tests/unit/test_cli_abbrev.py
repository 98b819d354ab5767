"""vzctl and vzlist options: only by their full names (a prefix is a usage error, exit 2, never another
option: `--name` was --nameserver, `--ip` was --ipadd); values out of range and VZ roots that cannot work are
usage errors too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, prog: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"VZ_ROOT": str(tmp_path / "vz"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", f"vzpkg.cli.{prog}", *args], env=env, capture_output=True,
                          text=True, timeout=30, cwd=PROJECT)


@pytest.mark.parametrize(("prog", "args", "option"), [
    ("vzctl", ["set", "101", "--name", "10.0.0.9", "--save"], "--name"),
    ("vzctl", ["set", "101", "--ip", "10.0.0.5", "--save"], "--ip"),
    ("vzctl", ["stop", "101", "--time", "5"], "--time"),
    ("vzctl", ["create", "101", "--ostemplate", "x", "--priv"], "--priv"),
    ("vzlist", ["--out", "veid"], "--out"),
])
def test_option_prefix_is_refused(tmp_path, prog, args, option):
    p = _run(tmp_path, prog, *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.startswith(f"{prog}: error: unrecognized arguments: {option}"), p.stderr
    assert p.stderr.count("\n") == 1
    assert not (tmp_path / "vz").exists()  # refused before anything was made


@pytest.mark.parametrize("shift", ["-5", "0", "4294901761", "99999999999999"])
def test_id_shift_out_of_range_is_a_usage_error(tmp_path, shift):
    """`vzctl create --id-shift` outside 1..4294901760 is wrong usage (exit 2, as every other out-of-range option
    value), refused before the VZ root or the cache is looked at."""
    p = _run(tmp_path, "vzctl", "create", "101", "--ostemplate", "debian-12-x86_64", f"--id-shift={shift}")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr == f"vzctl: error: --id-shift {int(shift)}: must be 1..4294901760 (host uid of the VE's root)\n"
    assert not (tmp_path / "vz").exists()


@pytest.mark.parametrize("name", ["vz,root", "vz:root"])
def test_vz_root_with_an_overlay_separator_is_refused(tmp_path, name):
    """A VZ root whose path has ',' or ':' let create succeed and every start fail (overlayfs splits its options
    and layers there): refused up front, exit 2, nothing made."""
    root = tmp_path / name
    for prog, args in (("vzctl", ["--root", str(root), "create", "101", "--ostemplate", "debian-12-x86_64"]),
                       ("vzlist", ["-a", "--root", str(root)])):
        p = _run(tmp_path, prog, *args)
        assert p.returncode == 2, (p.returncode, p.stderr)
        assert p.stderr.startswith(f"{prog}: error: VZ root '{root}': its path must not contain"), p.stderr
        assert not root.exists()


def test_system_directory_as_vz_root_is_refused(tmp_path):
    """`--root /` (or /var, /usr, ...): its run/, root/, lock/ are the host's; start would have made /run root-only
    0700. Refused before anything is looked at, exit 2 (status too, which was "deleted", exit 0)."""
    for root in ("/", "/var", "/usr/", "/var/lib/../tmp"):
        p = _run(tmp_path, "vzctl", "--root", root, "status", "101")
        assert p.returncode == 2, (root, p.returncode, p.stderr)
        assert "is a system directory" in p.stderr and p.stderr.count("\n") == 1


def test_secure_areas_do_not_follow_symlinks(tmp_path):
    """A VZ root whose run/ and lock/ are symlinks (as /var/run and /var/lock are: `--root` pointing at a copy of
    /var): start must not chown/chmod what they point to."""
    import os
    import stat

    root = tmp_path / "fakevar"
    target = tmp_path / "shared-run"
    target.mkdir()
    target.chmod(0o755)
    os.chown(target, 1000, 1000)
    root.mkdir()
    (root / "run").symlink_to(target)
    (root / "lock").symlink_to(target)
    p = _run(tmp_path, "vzctl", "--root", str(root), "start", "101")
    assert p.returncode == 31, (p.returncode, p.stderr)  # no such VE: but the areas were "secured" first
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 1000, 1000)


def test_clean_ves_refuses_a_system_directory(tmp_path):
    """`vzpkg clean --ves --root /` swept the host's /run (dead-pid temporary files), /lock and /root as if they
    were the VZ root's: exit 2 now, as vzctl. (Not run against the unfixed code: it would touch the host.)"""
    env = {"VZPKG_CACHE_DIR": str(tmp_path / "cache"), "VZPKG_CONFIG": "/nonexistent", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(PROJECT)}
    for root in ("/", "/var"):
        p = subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "clean", "--ves", "--root", root], env=env,
                           capture_output=True, text=True, timeout=30, cwd=PROJECT)
        assert p.returncode == 2, (root, p.returncode, p.stderr)
        assert p.stderr == (f"vzpkg: error: VZ root '{root}' is a system directory: its run/, root/, lock/ ... are "
                            "the host's; use a directory of its own (the default is /var/lib/vz)\n")
