"""vzctl and vzlist options: only by their full names (a prefix is a usage error, exit 2, never another
option: `--name` was --nameserver, `--ip` was --ipadd), and values out of range are usage errors too."""

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
