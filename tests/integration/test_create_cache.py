"""create-cache against the real Debian mirror named by the host's apt sources, and how it fails."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import VZPKG, copy_cache, default_sigint, run_vzpkg

from vzpkg.errors import (
    CacheExistsError,
    LockTimeoutError,
    MirrorError,
    ScriptError,
    SignatureError,
    VerifyError,
)
from vzpkg.store.extract import safe_unpack

pytestmark = [pytest.mark.root, pytest.mark.network]
NAME = "debian-12-x86_64"


def host_mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def assert_no_leftovers(cache_dir: Path) -> None:
    left = [p.name for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]
    assert left == [], f"leftovers in {cache_dir}: {left}"
    assert str(cache_dir) not in host_mounts(), "a mount below the cache dir was left behind"


def write_template(tmp: Path, name: str, body: str, scripts: dict[str, str] | None = None,
                   files: dict[str, str] | None = None) -> Path:
    d = tmp / "templates" / name
    d.mkdir(parents=True)
    (d / "template.toml").write_text(body)
    for script, text in (scripts or {}).items():
        (d / "scripts").mkdir(exist_ok=True)
        (d / "scripts" / script).write_text(text)
        (d / "scripts" / script).chmod(0o755)
    for rel, text in (files or {}).items():
        (d / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / "files" / rel).write_text(text)
    return tmp / "templates"


def template_env(templates: Path) -> dict[str, str]:
    project_templates = Path(__file__).resolve().parents[2] / "templates"
    return {"VZPKG_TEMPLATE_DIR": f"{templates}:{project_templates}"}


# ---- the good path --------------------------------------------------------------------------------


def test_manifest_describes_the_cache(debian12_cache: tuple[Path, str]) -> None:
    cache_dir, name = debian12_cache
    manifest = json.loads((cache_dir / f"{name}.json").read_text())
    for key in ("template_digest", "distribution", "release", "architecture", "mirror", "repositories", "packages",
                "vzpkg_version", "created", "durations", "unpacked_size", "packed_size", "sha256"):
        assert key in manifest, key
    assert manifest["release"] == "12"
    names = {p["name"]: p for p in manifest["packages"]}
    for pkg in ("apt", "bash", "procps", "iproute2", "ca-certificates", "base-files"):
        assert pkg in names, pkg
    assert names["base-files"]["version"].startswith("12")
    assert all(r["date"] and len(r["inrelease_sha256"]) == 64 for r in manifest["repositories"])
    for step in ("bootstrap", "install", "scripts", "clean", "manifest", "pack"):
        assert step in manifest["durations"]
    assert manifest["packed_size"] == (cache_dir / f"{name}.tar.zst").stat().st_size
    assert manifest["packed_size"] < manifest["unpacked_size"]


def test_cache_unpacks_to_a_clean_root(debian12_cache: tuple[Path, str], tmp_path: Path) -> None:
    cache_dir, name = debian12_cache
    root = tmp_path / "root"
    root.mkdir()
    safe_unpack(cache_dir / f"{name}.tar.zst", root)
    assert (root / "etc/debian_version").read_text().startswith("12")
    machine_id = root / "etc/machine-id"
    assert not machine_id.exists() or machine_id.read_text() == ""
    assert not list((root / "var/lib/apt/lists").glob("*_Packages"))
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert not list((root / "etc/ssh").glob("ssh_host_*")) if (root / "etc/ssh").exists() else True
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "test -x /usr/bin/ps && ip -V && apt-get --version | head -1"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_list_info_verify(debian12_cache: tuple[Path, str]) -> None:
    cache_dir, name = debian12_cache
    listing = json.loads(run_vzpkg("list", "--json", "--cache-dir", str(cache_dir), check=True).stdout)
    row = next(r for r in listing if r["name"] == name)
    assert row["cached"] and row["size"] > 10_000_000
    assert any(r["name"] == "debian-13-x86_64" for r in listing)
    text = run_vzpkg("list", "--cache-dir", str(cache_dir), check=True).stdout
    assert name in text and "yes" in text
    info = json.loads(run_vzpkg("info", name, "--json", "--cache-dir", str(cache_dir), check=True).stdout)
    assert info["template"]["suite"] == "bookworm"
    assert info["cache"]["sha256"] and "packages" not in info["cache"]
    pkgs = run_vzpkg("info", name, "--packages", "--cache-dir", str(cache_dir), check=True).stdout
    assert "procps" in pkgs
    verify = run_vzpkg("verify-cache", name, "--cache-dir", str(cache_dir))
    assert verify.returncode == 0, verify.stderr


def test_existing_cache_needs_force(debian12_cache: tuple[Path, str]) -> None:
    cache_dir, name = debian12_cache
    proc = run_vzpkg("create-cache", name, "--cache-dir", str(cache_dir))
    assert proc.returncode == CacheExistsError.exit_code
    assert "--force" in proc.stderr


def test_verify_detects_corruption(debian12_cache: tuple[Path, str], tmp_path: Path) -> None:
    cache_dir, name = debian12_cache
    copy_cache(cache_dir, tmp_path, name)
    archive = tmp_path / f"{name}.tar.zst"
    with archive.open("r+b") as f:
        f.seek(archive.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = run_vzpkg("verify-cache", name, "--cache-dir", str(tmp_path))
    assert proc.returncode == VerifyError.exit_code
    assert "sha256" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_remove_cache(debian12_cache: tuple[Path, str], tmp_path: Path) -> None:
    cache_dir, name = debian12_cache
    copy_cache(cache_dir, tmp_path, name)
    assert run_vzpkg("remove-cache", name, "--cache-dir", str(tmp_path)).returncode == 0
    assert not (tmp_path / f"{name}.tar.zst").exists() and not (tmp_path / f"{name}.json").exists()
    assert run_vzpkg("remove-cache", name, "--cache-dir", str(tmp_path)).returncode == 5


def test_reproducible_builds(seeded_cache_dir: Path) -> None:
    """Two full builds with one SOURCE_DATE_EPOCH and the same package versions are byte-identical, and so is
    a build that reuses the installed root from the build-stage cache."""
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    args = ("create-cache", NAME, "--force", "--cache-dir", str(seeded_cache_dir), "--json", "-q")
    m1 = json.loads(run_vzpkg(*args, "--no-stage-cache", env=env, check=True).stdout)
    m2 = json.loads(run_vzpkg(*args, env=env, check=True).stdout)
    m3 = json.loads(run_vzpkg(*args, env=env, check=True).stdout)
    assert (m1["stage"], m2["stage"], m3["stage"]) == ("disabled", "saved", "reused")
    assert m1["build_in_memory"] is True  # this machine has the memory: the root is built on a tmpfs
    assert "bootstrap" not in m3["durations"] and "restore-stage" in m3["durations"]
    assert [p["version"] for p in m1["packages"]] == [p["version"] for p in m2["packages"]]
    assert m1["sha256"] == m2["sha256"], "two full builds with one SOURCE_DATE_EPOCH differ"
    assert m3["sha256"] == m1["sha256"], "a build from the stage cache differs from a full build"
    assert_no_leftovers(seeded_cache_dir)


def test_template_set_with_files_and_scripts(seeded_cache_dir: Path, tmp_path: Path) -> None:
    templates = write_template(
        tmp_path, "debian-12-x86_64-extra",
        'inherits = "debian-12-x86_64"\nsummary = "t"\ndescription = "t"\npackages = ["file"]\n'
        '[environment]\nGREETING = "hello"\n',
        scripts={
            "pre-cache": '#!/bin/sh\nset -e\necho "pre $VZPKG_TEMPLATE" > "$1/pre-cache.txt"\n',
            "post-install": '#!/bin/sh\nset -e\ntest ! -e /proc/1/root/pre-cache.txt || true\n'
                            'echo "$GREETING from $(cat /etc/debian_version)" > /post-install.txt\n',
            "post-cache": '#!/bin/sh\nset -e\ntest -f "$1/post-install.txt"\ntouch "$1/post-cache.txt"\n',
        },
        files={"etc/motd.j2": "{{ name }} on {{ suite }} ({{ arch }})", "etc/vzpkg-static.txt": "static\n"},
    )
    # a symlink to a host file is copied as a symlink (never the host's file), also where the root has a symlink
    # on the way (/bin -> usr/bin in a merged-/usr root)
    (templates / "debian-12-x86_64-extra/files/etc/vzpkg-shadow").symlink_to("/etc/shadow")
    (templates / "debian-12-x86_64-extra/files/bin").mkdir()
    (templates / "debian-12-x86_64-extra/files/bin/vzpkg-tool").write_text("#!/bin/sh\n")
    proc = run_vzpkg("create-cache", "debian-12-x86_64-extra", "--cache-dir", str(seeded_cache_dir), "--json", "-q",
                     env=template_env(templates))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert "file" in {p["name"] for p in manifest["packages"]}
    root = tmp_path / "root"
    root.mkdir()
    safe_unpack(seeded_cache_dir / "debian-12-x86_64-extra.tar.zst", root)
    assert (root / "etc/motd").read_text().strip() == "debian-12-x86_64-extra on bookworm (amd64)"
    assert (root / "etc/vzpkg-static.txt").read_text() == "static\n"
    assert os.readlink(root / "etc/vzpkg-shadow") == "/etc/shadow"
    assert (root / "bin").is_symlink() and (root / "usr/bin/vzpkg-tool").read_text() == "#!/bin/sh\n"
    assert (root / "pre-cache.txt").read_text().strip() == "pre debian-12-x86_64-extra"
    assert (root / "post-install.txt").read_text().startswith("hello from 12")
    assert (root / "post-cache.txt").exists()


# ---- failures ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_http(tmp_path: Path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_unreachable_mirror(seeded_cache_dir: Path) -> None:
    started = time.monotonic()
    proc = run_vzpkg("create-cache", NAME, "--cache-dir", str(seeded_cache_dir),
                     "--mirror", f"http://127.0.0.1:{free_port()}/debian", env={"VZPKG_MIRROR_DEBIAN_SECURITY": ""})
    assert time.monotonic() - started < 30
    assert proc.returncode == MirrorError.exit_code, proc.stderr
    assert "127.0.0.1" in proc.stderr and "mirror" in proc.stderr
    assert not (seeded_cache_dir / f"{NAME}.tar.zst").exists()
    assert_no_leftovers(seeded_cache_dir)


def test_mirror_404(seeded_cache_dir: Path, local_http) -> None:
    _www, url = local_http
    started = time.monotonic()
    proc = run_vzpkg("create-cache", NAME, "--cache-dir", str(seeded_cache_dir), "--mirror", f"{url}/debian")
    assert time.monotonic() - started < 30
    assert proc.returncode == MirrorError.exit_code, proc.stderr
    assert "HTTP 404" in proc.stderr
    assert_no_leftovers(seeded_cache_dir)


def test_bad_signature_aborts(seeded_cache_dir: Path, local_http) -> None:
    """A mirror whose InRelease was altered after signing is refused."""
    from vzpkg.config import load_settings
    from vzpkg.distro.debian import Debian
    from vzpkg.repo.http import fetch

    www, url = local_http
    real = Debian().mirrors(load_settings())["mirror"]
    text = fetch(f"{real}/dists/bookworm/InRelease").content
    tampered = text.replace(b"Label: Debian", b"Label: Debiam", 1)
    assert tampered != text
    for suite in ("bookworm", "bookworm-updates"):
        (www / f"debian/dists/{suite}").mkdir(parents=True)
        (www / f"debian/dists/{suite}/InRelease").write_bytes(tampered)
    proc = run_vzpkg("create-cache", NAME, "--cache-dir", str(seeded_cache_dir), "--mirror", f"{url}/debian")
    assert proc.returncode == SignatureError.exit_code, proc.stderr
    assert "signature" in proc.stderr
    assert_no_leftovers(seeded_cache_dir)


def _one_error_line(stderr: str) -> str:
    """The single `vzpkg: error:` line of STDERR (no traceback, no second error line)."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("vzpkg: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("script, status, quoted", [
    # a command inside the root fails: the script's last lines are in the message
    ("#!/bin/sh\nset -e\necho failing on purpose\nls /no/such/dir\n", 2,
     ["failing on purpose", "cannot access '/no/such/dir'"]),
    # the chroot step itself fails (the script's interpreter is not in the root): chroot's own words
    ("#!/no/such/interpreter\nexit 0\n", 127, ["chroot: failed to run command"]),
], ids=["command-in-root", "chroot"])
def test_failing_post_install_publishes_nothing(seeded_cache_dir: Path, tmp_path: Path,
                                                debian12_cache: tuple[Path, str], script: str, status: int,
                                                quoted: list[str]) -> None:
    name = "debian-12-x86_64-broken"
    templates = write_template(
        tmp_path, name, 'inherits = "debian-12-x86_64"\nsummary = "t"\ndescription = "t"\n',
        scripts={"post-install": script},
    )
    # A previous good cache of this template must survive the failed rebuild.
    copy_cache(debian12_cache[0], seeded_cache_dir, NAME)
    for suffix in (".tar.zst", ".json"):
        os.rename(seeded_cache_dir / f"{NAME}{suffix}", seeded_cache_dir / f"{name}{suffix}")
    before = (seeded_cache_dir / f"{name}.tar.zst").stat()
    proc = run_vzpkg("create-cache", name, "--force", "--cache-dir", str(seeded_cache_dir), env=template_env(templates))
    assert proc.returncode == ScriptError.exit_code, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"{name}/scripts/post-install" in line and f"exit status {status}" in line, line
    assert all(q in line for q in quoted), line
    after = (seeded_cache_dir / f"{name}.tar.zst").stat()
    assert (before.st_ino, before.st_mtime) == (after.st_ino, after.st_mtime)
    assert_no_leftovers(seeded_cache_dir)


def _start_build(cache_dir: Path, *extra: str) -> subprocess.Popen[str]:
    # default_sigint: the SIGINT case must not depend on how pytest was started (in the background, SIGINT is
    # ignored and the child would inherit that and build on to the end)
    return subprocess.Popen([*VZPKG, "create-cache", NAME, "--force", "--cache-dir", str(cache_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def _wait_for_bootstrap(cache_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        roots = list(cache_dir.glob(".tmp-*-build-*/root/usr/bin"))
        if roots and len(list(roots[0].iterdir())) > 20:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("bootstrap did not start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_build_keeps_previous_cache(seeded_cache_dir: Path, debian12_cache: tuple[Path, str],
                                                sig: signal.Signals) -> None:
    copy_cache(debian12_cache[0], seeded_cache_dir, NAME)
    good_sha = json.loads((seeded_cache_dir / f"{NAME}.json").read_text())["sha256"]
    proc = _start_build(seeded_cache_dir)
    _wait_for_bootstrap(seeded_cache_dir, proc)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "nothing was published" in err
        assert_no_leftovers(seeded_cache_dir)
    else:
        # Give the bootstrapper (told by PDEATHSIG) time to exit before the next run takes over.
        time.sleep(2)
    verify = run_vzpkg("verify-cache", NAME, "--cache-dir", str(seeded_cache_dir))
    assert verify.returncode == 0, verify.stderr
    assert json.loads((seeded_cache_dir / f"{NAME}.json").read_text())["sha256"] == good_sha
    # The next run cleans up whatever the interrupted one left.
    rebuild = run_vzpkg("create-cache", NAME, "--force", "-q", "--cache-dir", str(seeded_cache_dir))
    assert rebuild.returncode == 0, rebuild.stderr
    assert_no_leftovers(seeded_cache_dir)
    assert run_vzpkg("verify-cache", NAME, "--cache-dir", str(seeded_cache_dir)).returncode == 0


def test_concurrent_builds_are_serialized(seeded_cache_dir: Path) -> None:
    first = _start_build(seeded_cache_dir)
    _wait_for_bootstrap(seeded_cache_dir, first)
    impatient = run_vzpkg("create-cache", NAME, "--force", "--timeout", "1", "--cache-dir", str(seeded_cache_dir))
    assert impatient.returncode == LockTimeoutError.exit_code
    assert "locked by another vzpkg run" in impatient.stderr
    patient = _start_build(seeded_cache_dir, "--timeout", "300")
    _o1, e1 = first.communicate(timeout=300)
    _o2, e2 = patient.communicate(timeout=300)
    assert first.returncode == 0, e1
    assert patient.returncode == 0, e2
    assert "waiting for template" in e2
    assert run_vzpkg("verify-cache", NAME, "--cache-dir", str(seeded_cache_dir)).returncode == 0
    assert_no_leftovers(seeded_cache_dir)


def test_debootstrap_fallback_builds_the_same_package_set(seeded_cache_dir: Path,
                                                          debian12_cache: tuple[Path, str]) -> None:
    proc = run_vzpkg("create-cache", NAME, "--cache-dir", str(seeded_cache_dir), "--json", "-q", "--no-stage-cache",
                     env={"VZPKG_BOOTSTRAPPER": "debootstrap", "VZPKG_BUILD_IN_MEMORY": "no"})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["bootstrapper"] == "debootstrap"
    assert manifest["build_in_memory"] is False
    reference = json.loads((debian12_cache[0] / f"{NAME}.json").read_text())
    assert {(p["name"], p["version"]) for p in manifest["packages"]} == \
        {(p["name"], p["version"]) for p in reference["packages"]}
    assert_no_leftovers(seeded_cache_dir)


def _build_processes(work_root: Path) -> list[tuple[int, str]]:
    """Processes of a build below WORK_ROOT: chrooted or working there (dpkg, maintainer scripts), or apt-get and
    its methods, which mmdebstrap runs outside the root with APT_CONFIG inside it."""
    real = os.path.realpath(work_root).rstrip("/") + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            links = [os.readlink(f"/proc/{entry}/{link}").rstrip("/") + "/" for link in ("root", "cwd")]
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if any(t.startswith(real) for t in links) or real.encode() in environ:
            found.append((int(entry), comm))
    return found


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_sigkill_during_apt_leaves_no_process_or_tool_mount(seeded_cache_dir: Path, in_memory: str) -> None:
    """kill -9 of vzpkg while apt/dpkg run: within seconds nothing of the build runs any more (apt's _apt
    methods included), the bootstrapper's mounts are gone; the next run removes the work directory."""
    env = {**os.environ, "VZPKG_BUILD_IN_MEMORY": in_memory}
    proc = subprocess.Popen([*VZPKG, "create-cache", NAME, "--no-stage-cache", "-q", "--cache-dir",
                             str(seeded_cache_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    seen: list[tuple[int, str]] = []
    while time.monotonic() < deadline and proc.poll() is None:
        seen = _build_processes(seeded_cache_dir)
        if any(comm in ("apt-get", "http", "dpkg") for _pid, comm in seen):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert seen, "apt never ran"
    proc.kill()
    proc.wait()
    work = next(seeded_cache_dir.glob(f".tmp-{NAME}-build-*"))
    deadline = time.monotonic() + 5
    while (left := _build_processes(seeded_cache_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"build processes still running 5 s after vzpkg was killed: {left} (were: {seen})"
    mounts = [m for m in host_mounts().splitlines() if str(work) in m]
    # Only vzpkg's own tmpfs for the root may remain (VZPKG_BUILD_IN_MEMORY): the next run unmounts it.
    assert len(mounts) == (1 if in_memory == "yes" else 0), mounts
    rebuild = run_vzpkg("create-cache", NAME, "-q", "--cache-dir", str(seeded_cache_dir))
    assert rebuild.returncode == 0, rebuild.stderr
    assert_no_leftovers(seeded_cache_dir)
    assert run_vzpkg("verify-cache", NAME, "--cache-dir", str(seeded_cache_dir)).returncode == 0
