"""A template's files/ and scripts/ never lead outside the template or the root being built (issue 8, item 1).

render_files is the code create-cache and update-cache run; the roots here are plain directories shaped like
the ones packages leave (merged /usr symlinks, absolute symlinks, a symlink at a file's name).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vzpkg.build.pipeline import render_files
from vzpkg.errors import BuildError, TemplateError
from vzpkg.template import TemplateRepository

BASE = """
summary = "test"
description = "test template"
distribution = "debian"
release = "12"
suite = "bookworm"
architecture = "x86_64"
package_manager = "apt"
packages = ["procps"]
repositories = ["deb {{ mirror }} {{ suite }} main"]
"""
NAME = "t-12-x86_64"
CONTEXT = {"name": NAME, "suite": "bookworm", "arch": "amd64", "mirror": "http://m.invalid"}


@pytest.fixture
def tdir(tmp_path: Path) -> Path:
    d = tmp_path / "templates" / NAME
    (d / "files").mkdir(parents=True)
    (d / "template.toml").write_text(BASE)
    return d


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Stands for the host's /etc: a file a template must never copy and a root must never write."""
    h = tmp_path / "host-etc"
    h.mkdir()
    (h / "shadow").write_text("root:SECRET:19000::::::\n")
    return h


def load(tdir: Path):
    return TemplateRepository([tdir.parent]).load(tdir.name)


def validate_cli(tdir: Path) -> subprocess.CompletedProcess[str]:
    env = {"VZPKG_TEMPLATE_DIR": str(tdir.parent), "PATH": "/usr/bin:/bin", "VZPKG_CONFIG": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate", tdir.name], env=env,
                          capture_output=True, text=True)


def test_symlink_to_a_host_file_is_copied_as_a_symlink(tdir: Path, host: Path, tmp_path: Path) -> None:
    (tdir / "files/etc").mkdir()
    (tdir / "files/etc/shadow").symlink_to(host / "shadow")
    (tdir / "files/etc/relative").symlink_to("../usr/share/x")
    (tdir / "files/etc/plain").write_text("plain\n")
    root = tmp_path / "root"
    root.mkdir()
    assert render_files(load(tdir), root, CONTEXT) == 3
    assert (root / "etc/shadow").is_symlink()
    assert os.readlink(root / "etc/shadow") == str(host / "shadow")
    assert os.readlink(root / "etc/relative") == "../usr/share/x"
    assert (root / "etc/plain").read_text() == "plain\n"
    assert not any("SECRET" in p.read_text() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_symlinked_directory_is_not_descended(tdir: Path, host: Path, tmp_path: Path) -> None:
    (tdir / "files/hostetc").symlink_to(host, target_is_directory=True)
    root = tmp_path / "root"
    root.mkdir()
    render_files(load(tdir), root, CONTEXT)
    assert (root / "hostetc").is_symlink() and os.readlink(root / "hostetc") == str(host)
    assert sorted(os.listdir(root)) == ["hostetc"]


def test_symlink_loop_in_files_is_copied_as_it_is(tdir: Path, tmp_path: Path) -> None:
    (tdir / "files/loop").symlink_to("loop")
    assert validate_cli(tdir).returncode == 0
    root = tmp_path / "root"
    root.mkdir()
    render_files(load(tdir), root, CONTEXT)
    assert os.readlink(root / "loop") == "loop"


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


def _device(p: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of a device needs root")
    os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))


@pytest.mark.parametrize(("make", "kind"), [(_fifo, "fifo"), (_socket, "socket"), (_device, "character device")])
def test_special_files_are_refused_at_load_and_by_validate(tdir: Path, make, kind: str) -> None:
    (tdir / "files/etc").mkdir()
    make(tdir / "files/etc/odd")
    with pytest.raises(TemplateError) as err:
        load(tdir)
    assert str(err.value).startswith(f"{tdir}/files/etc/odd: a {kind} in files/")
    proc = validate_cli(tdir)
    assert proc.returncode == TemplateError.exit_code
    assert f"{tdir}/files/etc/odd: a {kind}" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_files_directory_that_is_a_symlink_is_refused(tdir: Path, host: Path) -> None:
    (tdir / "files").rmdir()
    (tdir / "files").symlink_to(host)
    with pytest.raises(TemplateError, match=r"files: is a symlink .*never followed"):
        load(tdir)


def test_j2_symlink_is_refused(tdir: Path, host: Path) -> None:
    (tdir / "files/motd.j2").symlink_to(host / "shadow")
    with pytest.raises(TemplateError, match=r"motd\.j2: a symlink cannot be rendered"):
        load(tdir)


def test_digest_does_not_read_through_symlinks(tdir: Path, host: Path) -> None:
    (tdir / "files/shadow").symlink_to(host / "shadow")
    before = load(tdir).digest()
    (host / "shadow").write_text("changed on the host\n")
    assert load(tdir).digest() == before  # the link is hashed, not the host file
    (tdir / "files/shadow").unlink()
    (tdir / "files/shadow").symlink_to("/elsewhere")
    assert load(tdir).digest() != before


# ---- the root being built -----------------------------------------------------------------------------------


def test_absolute_symlink_in_the_root_resolves_inside_the_root(tdir: Path, host: Path, tmp_path: Path) -> None:
    """The root's etc -> HOST (an absolute path that exists on the host): the write lands in ROOT/HOST."""
    (tdir / "files/etc").mkdir()
    (tdir / "files/etc/shadow").write_text("template's\n")
    (tdir / "files/etc/new.conf").write_text("new\n")
    root = tmp_path / "root"
    inner = root / str(host).lstrip("/")
    inner.mkdir(parents=True)
    (root / "etc").symlink_to(host)
    render_files(load(tdir), root, CONTEXT)
    assert (host / "shadow").read_text() == "root:SECRET:19000::::::\n"
    assert not (host / "new.conf").exists()
    assert (inner / "shadow").read_text() == "template's\n"
    assert (inner / "new.conf").read_text() == "new\n"


def test_symlink_at_the_files_name_is_replaced_not_written_through(tdir: Path, host: Path, tmp_path: Path) -> None:
    (tdir / "files/etc").mkdir()
    (tdir / "files/etc/hostname.j2").write_text("{{ name }}\n")
    (tdir / "files/etc/motd").write_text("hello\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").symlink_to(host / "shadow")
    (root / "etc/motd").symlink_to(host / "shadow")
    render_files(load(tdir), root, CONTEXT)
    assert (host / "shadow").read_text() == "root:SECRET:19000::::::\n"
    for name, text in (("hostname", f"{NAME}\n"), ("motd", "hello\n")):
        assert not (root / "etc" / name).is_symlink()
        assert (root / "etc" / name).read_text() == text


def test_dotdot_symlinks_in_the_root_are_clamped_to_it(tdir: Path, tmp_path: Path) -> None:
    (tdir / "files/etc/up").mkdir(parents=True)
    (tdir / "files/etc/up/escaped").write_text("x\n")
    root = tmp_path / "a/b/root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/up").symlink_to("../../../../../..")
    render_files(load(tdir), root, CONTEXT)
    assert (root / "escaped").read_text() == "x\n"
    assert not (tmp_path / "escaped").exists() and not Path("/escaped").exists()


def test_merged_usr_symlinks_still_work(tdir: Path, tmp_path: Path) -> None:
    (tdir / "files/bin").mkdir()
    (tdir / "files/bin/tool").write_text("#!/bin/sh\n")
    (tdir / "files/bin/tool").chmod(0o750)
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    render_files(load(tdir), root, CONTEXT)
    assert (root / "bin").is_symlink()
    assert (root / "usr/bin/tool").read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((root / "usr/bin/tool").stat().st_mode) == 0o750


def test_a_directory_in_the_way_is_a_build_error(tdir: Path, tmp_path: Path) -> None:
    (tdir / "files/etc").mkdir()
    (tdir / "files/etc/conf").write_text("x\n")
    root = tmp_path / "root"
    (root / "etc/conf/sub").mkdir(parents=True)
    with pytest.raises(BuildError, match=r"etc/conf: a directory is there"):
        render_files(load(tdir), root, CONTEXT)
    assert sorted(os.listdir(root / "etc")) == ["conf"]  # no temporary file left


# ---- scripts --------------------------------------------------------------------------------------------------


def test_script_symlink_outside_the_template_is_refused(tdir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.sh"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    (tdir / "scripts").mkdir()
    (tdir / "scripts/post-install").symlink_to(outside)
    with pytest.raises(TemplateError, match=r"scripts/post-install: a symlink to .*outside the template directory"):
        load(tdir)
    proc = validate_cli(tdir)
    assert proc.returncode == TemplateError.exit_code and "outside the template directory" in proc.stdout


def test_scripts_directory_linking_out_is_refused(tdir: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tdir / "scripts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TemplateError, match=r"scripts: a symlink to .*outside the template directory"):
        load(tdir)


def test_script_symlink_inside_the_template_is_fine(tdir: Path) -> None:
    (tdir / "scripts").mkdir()
    (tdir / "scripts/post-install").write_text("#!/bin/sh\n")
    (tdir / "scripts/post-update").symlink_to("post-install")
    t = load(tdir)
    assert [p.name for p in t.scripts("post-update")] == ["post-update"]


@pytest.mark.parametrize("make", ["loop", "dangling", "directory", "not-executable"])
def test_unusable_scripts_are_refused(tdir: Path, make: str) -> None:
    (tdir / "scripts").mkdir()
    script = tdir / "scripts/pre-cache"
    if make == "loop":
        script.symlink_to("pre-cache")
    elif make == "dangling":
        script.symlink_to("missing")
    elif make == "directory":
        script.mkdir()
    else:
        script.write_text("#!/bin/sh\n")
        script.chmod(0o644)
    proc = validate_cli(tdir)
    assert proc.returncode == TemplateError.exit_code, proc.stderr
    assert f"{script}: " in proc.stdout and "Traceback" not in proc.stderr


def test_without_openat2_a_symlink_on_the_way_is_refused(tdir: Path, host: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.6 have no openat2: the fallback walk refuses symlinks instead of resolving them."""
    from vzpkg.build import inroot

    monkeypatch.setattr(inroot, "_have_openat2", False)
    (tdir / "files/etc").mkdir()
    (tdir / "files/etc/new.conf").write_text("new\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(host)
    with pytest.raises(BuildError, match=r"root/etc: a symlink in the root is in the way"):
        render_files(load(tdir), root, CONTEXT)
    assert not (host / "new.conf").exists()


# ---- the build's own work on the root (clean-up, mounts) never follows a root's symlink onto the host ----------


def test_clean_root_leaves_the_host_alone(host: Path, tmp_path: Path) -> None:
    from vzpkg.build.pipeline import clean_root

    (host / "machine-id").write_text("host-id\n")
    (host / "syslog.log").write_text("host log\n")
    (host / "keep.tmp").write_text("host tmp\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "etc/machine-id").symlink_to(host / "machine-id")
    (root / "var/log").symlink_to(host)          # absolute, as a script inside the root might leave it
    (root / "tmp").symlink_to(host)
    (root / "var/tmp").mkdir()
    (root / "var/tmp/own").write_text("the root's\n")
    clean_root(root)
    assert (host / "machine-id").read_text() == "host-id\n"
    assert (host / "syslog.log").read_text() == "host log\n"
    assert (host / "keep.tmp").read_text() == "host tmp\n"
    assert (host / "shadow").exists()
    assert not (root / "var/tmp/own").exists()  # what is really in the root is still cleaned


def test_build_mounts_refuse_a_root_symlink_leading_out(tmp_path: Path) -> None:
    from vzpkg.build.chroot import build_mounts, mounts_below

    outside = tmp_path / "outside-proc"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "proc").symlink_to(outside)
    with pytest.raises(BuildError, match=r"refusing to mount over .*/root/proc: a symlink in the root leads out"):
        with build_mounts(root):
            pass
    assert mounts_below(outside) == [] and mounts_below(root) == []
