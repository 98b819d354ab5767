"""Build a small signed RPM repository for the dnf backend's tests, and serve it on 127.0.0.1.

Packages (all tiny; the only real binary is Debian's static busybox):
    vzt-filesystem   directories, /etc/passwd, /etc/group
    vzt-busybox      /bin/busybox and applet links (/bin/sh, echo, cat, ls, ...)
    vzt-post         a %post scriptlet that writes /var/lib/vzt-post.marker
    vzt-a → vzt-b → vzt-c   a dependency chain
    vzt-epoch        2.0-1, and 1:1.5-1 (a lower version whose Epoch bump makes it newer)
    vzt-slow         a %post scriptlet that sleeps for two minutes (for interruption tests)
    vzt-badpre       a %pre scriptlet that fails (dnf itself fails)
    vzt-unsigned     not signed
    vzt-tampered     signed, then a byte of its header changed
The repository directory also holds RPM-GPG-KEY-vzt (the signing key) and, beside it, `broken/` whose
repodata/repomd.xml is not XML.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ash", "echo", "cat", "ls", "mkdir", "rm", "touch", "true", "false", "test", "id", "env", "uname",
           "sleep")
KEY_NAME = "vzpkg test signing key"
TOOLS = ("rpmbuild", "rpmsign", "createrepo_c", "gpg", "dnf", "rpm")

SPEC_HEAD = """\
Name: {name}
Version: {version}
Release: {release}
{epoch}Summary: {summary}
License: MIT
BuildArch: {arch}
AutoReqProv: no
{requires}
%description
vzpkg test package {name}.

%install
mkdir -p %{{buildroot}}
{install}

{post}
%files
{files}
"""


@dataclass
class Package:
    name: str
    version: str = "1.0"
    release: str = "1"
    epoch: int | None = None
    arch: str = "noarch"
    requires: tuple[str, ...] = ()
    install: str = ""
    files: str = ""
    post: str = ""
    pre: str = ""
    summary: str = "vzpkg test package"
    sign: bool = True


def packages() -> list[Package]:
    dirs = ["bin", "etc", "root", "tmp", "var", "var/lib", "var/tmp", "var/log", "var/cache", "usr", "usr/bin",
            "usr/share", "run", "home"]
    fs_install = "\n".join(f"mkdir -p %{{buildroot}}/{d}" for d in dirs) + "\n" + (
        "printf 'root:x:0:0:root:/root:/bin/sh\\nnobody:x:65534:65534:nobody:/:/bin/false\\n' "
        "> %{buildroot}/etc/passwd\n"
        "printf 'root:x:0:\\nnogroup:x:65534:\\n' > %{buildroot}/etc/group\n"
    )
    fs_files = "\n".join(f"%dir /{d}" for d in dirs) + "\n/etc/passwd\n/etc/group"
    bb_install = (f"mkdir -p %{{buildroot}}/bin\ninstall -m 755 {BUSYBOX} %{{buildroot}}/bin/busybox\n"
                  + "\n".join(f"ln -s busybox %{{buildroot}}/bin/{a}" for a in APPLETS))
    bb_files = "/bin/busybox\n" + "\n".join(f"/bin/{a}" for a in APPLETS)

    def share(name: str) -> tuple[str, str]:
        return (f"mkdir -p %{{buildroot}}/usr/share/vzt\necho {name} > %{{buildroot}}/usr/share/vzt/{name}",
                f"/usr/share/vzt/{name}")

    out = [
        Package("vzt-filesystem", install=fs_install, files=fs_files),
        Package("vzt-busybox", version="1.35.0", arch="x86_64", requires=("vzt-filesystem",), install=bb_install,
                files=bb_files),
        Package("vzt-post", requires=("vzt-filesystem", "Requires(post): /bin/sh"),
                post='echo "post ran: $1" > /var/lib/vzt-post.marker', install=share("post")[0],
                files="%dir /usr/share/vzt\n" + share("post")[1]),
    ]
    for name, dep in (("vzt-a", "vzt-b"), ("vzt-b", "vzt-c"), ("vzt-c", "vzt-filesystem")):
        ins, fil = share(name)
        out.append(Package(name, requires=(dep,), install=ins, files=fil))
    for version, epoch in (("2.0", None), ("1.5", 1)):
        ins, fil = share("epoch")
        out.append(Package("vzt-epoch", version=version, epoch=epoch, install=ins, files=fil))
    ins, fil = share("slow")
    out.append(Package("vzt-slow", requires=("vzt-busybox", "Requires(post): /bin/sh"), install=ins, files=fil,
                       post="touch /var/lib/vzt-slow.started; sleep 120"))
    ins, fil = share("badpre")
    out.append(Package("vzt-badpre", requires=("vzt-busybox", "Requires(pre): /bin/sh"), install=ins, files=fil,
                       pre='echo "vzt-badpre refuses to install" >&2; exit 3'))
    ins, fil = share("unsigned")
    out.append(Package("vzt-unsigned", install=ins, files=fil, sign=False))
    ins, fil = share("tampered")
    out.append(Package("vzt-tampered", install=ins, files=fil, summary="VZT-TAMPER-ME-HERE"))
    return out


def spec_text(p: Package) -> str:
    requires = "\n".join(r if r.startswith("Requires") else f"Requires: {r}" for r in p.requires)
    return SPEC_HEAD.format(name=p.name, version=p.version, release=p.release,
                            epoch=f"Epoch: {p.epoch}\n" if p.epoch is not None else "", summary=p.summary,
                            arch=p.arch, requires=requires, install=p.install,
                            post=(f"%pre\n{p.pre}\n" if p.pre else "") + (f"%post\n{p.post}\n" if p.post else ""), files=p.files)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_key(gnupghome: Path) -> Path:
    """A throwaway signing key; returns its exported public key file."""
    gnupghome.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**os.environ, "GNUPGHOME": str(gnupghome)}
    _run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", KEY_NAME, "rsa2048", "sign", "never"], env=env)
    pub = gnupghome / "RPM-GPG-KEY-vzt"
    pub.write_text(_run(["gpg", "--batch", "--armor", "--export", KEY_NAME], env=env).stdout)
    return pub


def build_repository(base: Path) -> Path:
    """Build, sign and index the packages under BASE; return the repository directory (BASE/repo)."""
    top = base / "rpmbuild"
    repo = base / "repo"
    gnupghome = base / "gnupg"
    for d in ("SPECS", "RPMS", "BUILD", "BUILDROOT", "SRPMS", "SOURCES"):
        (top / d).mkdir(parents=True, exist_ok=True)
    repo.mkdir(parents=True, exist_ok=True)
    home = base / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "GNUPGHOME": str(gnupghome)}
    defines = ["--define", f"_topdir {top}", "--define", "debug_package %{nil}", "--define", "__os_install_post %{nil}",
               "--define", "_build_id_links none", "--define", f"_dbpath {home}/rpmdb"]
    built: dict[str, list[Path]] = {"signed": [], "unsigned": []}
    tampered: list[Path] = []
    for p in packages():
        spec = top / "SPECS" / f"{p.name}-{p.version}.spec"
        spec.write_text(spec_text(p))
        before = set((top / "RPMS").rglob("*.rpm"))
        _run(["rpmbuild", "-bb", "--nodeps", "--quiet", *defines, str(spec)], env=env)
        new = sorted(set((top / "RPMS").rglob("*.rpm")) - before)
        assert len(new) == 1, new
        dest = repo / new[0].name
        shutil.copy2(new[0], dest)
        built["signed" if p.sign else "unsigned"].append(dest)
        if p.name == "vzt-tampered":
            tampered.append(dest)
    pub = make_key(gnupghome)
    shutil.copy2(pub, repo / "RPM-GPG-KEY-vzt")
    _run(["rpmsign", "--addsign", "--define", f"_gpg_name {KEY_NAME}", "--define", f"_gpg_path {gnupghome}",
          "--define", f"__gpg {shutil.which('gpg')}",
          *[str(p) for p in built["signed"]]], env=env)
    subprocess.run(["gpgconf", "--homedir", str(gnupghome), "--kill", "gpg-agent"], capture_output=True)
    for path in tampered:  # a changed header byte: header digest and signature no longer match
        data = path.read_bytes()
        assert data.count(b"VZT-TAMPER-ME-HERE") == 1
        path.write_bytes(data.replace(b"VZT-TAMPER-ME-HERE", b"VZT-TAMPERED-HERE!"))
    _run(["createrepo_c", "--quiet", "--no-database", str(repo)])
    broken = base / "broken" / "repodata"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "repomd.xml").write_text("<repomd this is not xml")
    return repo


# ---- changing a repository (update tests; build_repository's layout under BASE) -------------------------


def _env_defines(base: Path) -> tuple[dict[str, str], list[str]]:
    top = base / "rpmbuild"
    home = base / "home"
    env = {**os.environ, "HOME": str(home), "GNUPGHOME": str(base / "gnupg")}
    defines = ["--define", f"_topdir {top}", "--define", "debug_package %{nil}", "--define", "__os_install_post %{nil}",
               "--define", "_build_id_links none", "--define", f"_dbpath {home}/rpmdb"]
    return env, defines


def versioned(name: str, version: str, *, epoch: int | None = None, release: str = "1", sign: bool = True,
              requires: tuple[str, ...] = ()) -> Package:
    """A package shipping /usr/share/vzt/NAME whose content is 'NAME EPOCH:VERSION-RELEASE' (readable in a root)."""
    evr = f"{epoch or 0}:{version}-{release}"
    return Package(name, version=version, release=release, epoch=epoch, sign=sign, requires=requires,
                   install=f"mkdir -p %{{buildroot}}/usr/share/vzt\necho '{name} {evr}' > %{{buildroot}}/usr/share/vzt/{name}",
                   files=f"/usr/share/vzt/{name}")


def add_packages(base: Path, repo: Path, new: list[Package]) -> list[Path]:
    """Build NEW into REPO (a repository made by build_repository(BASE), or a copy of its repo directory),
    signing those with sign=True with BASE's key; call createrepo() afterwards. Returns the .rpm files."""
    env, defines = _env_defines(base)
    top = base / "rpmbuild"
    out = []
    for p in new:
        spec = top / "SPECS" / f"{p.name}-{p.epoch or 0}-{p.version}-{p.release}.spec"
        spec.write_text(spec_text(p))
        before = set((top / "RPMS").rglob("*.rpm"))
        _run(["rpmbuild", "-bb", "--nodeps", "--quiet", *defines, str(spec)], env=env)
        built = sorted(set((top / "RPMS").rglob("*.rpm")) - before)
        if not built:  # the same NVRA built earlier (another epoch): rpmbuild overwrote it
            built = [top / "RPMS" / p.arch / f"{p.name}-{p.version}-{p.release}.{p.arch}.rpm"]
        dest = repo / built[0].name
        shutil.copy2(built[0], dest)
        if p.sign:
            _run(["rpmsign", "--addsign", "--define", f"_gpg_name {KEY_NAME}", "--define", f"_gpg_path {base / 'gnupg'}",
                  "--define", f"__gpg {shutil.which('gpg')}", str(dest)], env=env)
        out.append(dest)
    subprocess.run(["gpgconf", "--homedir", str(base / "gnupg"), "--kill", "gpg-agent"], capture_output=True)
    return out


def createrepo(repo: Path, *, sign_base: Path | None = None) -> Path:
    """Re-index REPO (createrepo_c); with SIGN_BASE, also write repodata/repomd.xml.asc signed with its key.
    Returns repomd.xml."""
    _run(["createrepo_c", "--quiet", "--no-database", str(repo)])
    repomd = repo / "repodata" / "repomd.xml"
    if sign_base is not None:
        asc = repomd.with_name("repomd.xml.asc")
        asc.unlink(missing_ok=True)
        env, _ = _env_defines(sign_base)
        _run(["gpg", "--batch", "--yes", "--local-user", KEY_NAME, "--armor", "--detach-sign", "--output", str(asc),
              str(repomd)], env=env)
        subprocess.run(["gpgconf", "--homedir", str(sign_base / "gnupg"), "--kill", "gpg-agent"], capture_output=True)
    return repomd


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class Server:
    """A static file server on 127.0.0.1 (an ephemeral port), in a thread of the test process."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # build once by hand: python3 tests/integration/rpmrepo.py DIR
    import sys

    print(build_repository(Path(sys.argv[1])))
