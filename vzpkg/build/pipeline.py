"""The create-cache pipeline: lock → bootstrap → install → files → scripts → clean → manifest → pack → publish.

Every build works in a temporary directory beside the cache and publishes with a rename, so an interrupted or
failed build never replaces a good cache, and leaves neither mounts nor temporary files behind (what a SIGKILL
leaves is removed by the next run, under the same lock).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Settings
from ..errors import BuildError, CacheExistsError
from ..interrupt import signals_raise
from ..lock import locked
from ..pkgmgr import get_backend
from ..pkgmgr.base import BuildContext, PackageManager
from ..store.archive import PackResult, pack
from ..store.cache import CacheStore, check_writable
from ..template import Template, TemplateRepository
from . import stage
from .chroot import (
    build_mounts,
    host_resolver,
    mounts_below,
    no_daemons,
    prepare_build_root,
    remove_work_dir,
    run_script,
)
from .inroot import inside, remove_matches
from .sources import template_sources
from .stage import StageStore

DEFAULT_LOCK_TIMEOUT = 600.0


class Reporter:
    """Progress sink; the CLI supplies one that prints. The default is silent."""

    def step(self, name: str, seconds: float, detail: str = "") -> None: ...
    def note(self, message: str) -> None: ...
    def verbose(self, message: str) -> None: ...
    def shows_progress(self) -> bool:
        return False

    def progress(self, done: int, total: int) -> None: ...
    def progress_end(self) -> None: ...


@dataclass
class BuildOptions:
    force: bool = False
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    verbose: bool = False
    stage_cache: bool = True


@dataclass
class StepTimer:
    reporter: Reporter
    durations: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str, detail: Callable[[], str] | None = None) -> Iterator[None]:
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.durations[name] = round(seconds, 3)
        self.reporter.step(name, seconds, detail() if detail else "")


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return int(value) if value and value.isdigit() else None


def _dir_size(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def render_files(template: Template, root: Path, context: dict[str, Any]) -> int:
    """Copy each `files/` tree of the template chain into ROOT; `*.j2` files are rendered with jinja2.

    Symlinks are copied as symlinks, never followed (a link to a host file copies the link, not the file). Paths
    are resolved inside ROOT (vzpkg.build.inroot): a symlink the packages put in the root cannot lead a write out of it,
    and one at a file's own name is replaced, not written through."""
    from ..template import render_file
    from .inroot import RootWriter
    from .template_files import files_entries, open_regular

    count = 0
    with RootWriter(root) as writer:
        for tree in template.file_trees():
            for entry in files_entries(tree):
                mode = stat.S_IMODE(entry.st.st_mode)
                if entry.kind == "dir":
                    os.close(writer.make_dirs(entry.rel, mode))
                    continue
                if entry.kind == "symlink":
                    writer.symlink(entry.rel, os.readlink(entry.path), entry.times_ns)
                elif entry.rel.suffix == ".j2":
                    text = render_file(entry.path, context)
                    writer.write_file(entry.rel.with_suffix(""), None, (text.strip() + "\n").encode(), mode, None)
                else:
                    fd = open_regular(entry.path)
                    try:
                        writer.write_file(entry.rel, fd, None, mode, entry.times_ns)
                    finally:
                        os.close(fd)
                count += 1
    return count


def clean_root(root: Path) -> None:
    """What no cache should carry: identity, logs, temporary files. Package-manager caches are the backend's."""
    # Paths that a symlink of the root leads onto the host (an absolute `var/log -> /var/log`) are left alone.
    machine_id = root / "etc/machine-id"
    if machine_id.exists() and inside(root, machine_id):
        machine_id.write_text("")  # empty: a fresh id is made when the VE first boots
    if inside(root, root / "var/lib/dbus"):
        (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for pattern in ("etc/ssh/ssh_host_*", "tmp/*", "tmp/.*", "var/tmp/*", "root/.bash_history",
                    "var/log/*.log", "var/log/apt/*", "var/log/journal/*", "etc/resolv.conf.vzpkg-*"):
        remove_matches(root, pattern)
    for log in ("var/log/lastlog", "var/log/wtmp", "var/log/btmp", "var/log/faillog"):
        p = root / log
        if p.exists() and inside(root, p):
            p.write_bytes(b"")


def run_template_scripts(template: Template, which: str, ctx: BuildContext, env: dict[str, str], *,
                         inside: bool) -> int:
    """Run the template chain's scripts called WHICH: on the host with the root as $1, or inside the root."""
    scripts = template.scripts(which)
    if not scripts:
        return 0
    if not inside:
        for script in scripts:
            run_script(script, root=ctx.root, inside=False, env=env, quiet=ctx.quiet, log=ctx.log)
        return len(scripts)
    with build_mounts(ctx.root), host_resolver(ctx.root), no_daemons(ctx.root):
        for script in scripts:
            run_script(script, root=ctx.root, inside=True, env=env, quiet=ctx.quiet, log=ctx.log)
    return len(scripts)


def clean_for_packing(template: Template, backend: PackageManager, ctx: BuildContext, env: dict[str, str]) -> None:
    """The backend's clean, then the common one, then post-cache scripts: the root as it will be packed."""
    backend.clean(ctx)
    clean_root(ctx.root)
    run_template_scripts(template, "post-cache", ctx, env, inside=False)


def prepare_context(template: Template, settings: Settings, work_dir: Path, verbose: bool,
                    reporter: Reporter) -> BuildContext:
    return BuildContext.from_sources(template, settings, template_sources(template, settings), work_dir,
                                     _fresh_log(settings, template.name), verbose=verbose, note=reporter.verbose)


def _fresh_log(settings: Settings, name: str) -> Path:
    """The build log lives outside the work dir, so it outlives a failed build for the user to read."""
    log = settings.cache_dir / ".logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    return log


def create_cache(name: str, settings: Settings, options: BuildOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Build the cache of template NAME and publish it; return its manifest."""
    reporter = reporter or Reporter()
    template = TemplateRepository(settings.template_dirs).load(name)
    store = CacheStore(settings.cache_dir)
    if store.exists(name) and not options.force:
        raise CacheExistsError(f"cache {store.archive_path(name)} exists: use --force to rebuild it, "
                               f"or 'vzpkg update-cache {name}' to bring it up to date")
    check_writable(settings.cache_dir)
    reporter.note(f"creating cache {name} in {settings.cache_dir}")
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    timer = StepTimer(reporter)
    started = time.monotonic()
    with signals_raise(), locked(settings.lock_dir / f"{name}.lock", timeout=options.lock_timeout,
                                  what=f"template {name}", on_wait=reporter.note):
        # Re-check under the lock: a concurrent run may have just built it.
        if store.exists(name) and not options.force:
            raise CacheExistsError(f"cache {store.archive_path(name)} was just built by another run")
        for leftover in store.clean_leftovers(name):
            reporter.note(f"removed leftover of an interrupted run: {leftover}")
        work_dir = store.temp_path(name, "build")
        archive_tmp = store.temp_path(name, "archive")
        work_dir.mkdir()
        try:
            manifest = _build(template, settings, options, reporter, timer, store, work_dir, archive_tmp)
            manifest["durations"]["total"] = round(time.monotonic() - started, 3)
            with timer.step("publish"):
                store.publish(name, archive_tmp, manifest)
            return manifest
        finally:
            remove_work_dir(work_dir)
            archive_tmp.unlink(missing_ok=True)


def _build(template: Template, settings: Settings, options: BuildOptions, reporter: Reporter, timer: StepTimer,
           store: CacheStore, work_dir: Path, archive_tmp: Path) -> dict[str, Any]:
    ctx = prepare_context(template, settings, work_dir, options.verbose, reporter)
    backend = get_backend(template["package_manager"])
    backend.check_host(ctx)
    with timer.step("check-repositories", lambda: f"{len(repo_state)} repositories verified"):
        repo_state = backend.check_repositories(ctx)

    stages = StageStore(settings.cache_dir)
    use_stage = options.stage_cache and stage.enabled()
    key = stage.stage_key(template.data, ctx.repositories, repo_state, backend.bootstrapper_name(ctx),
                          source_date_epoch())
    ctx.facts["build_in_memory"] = prepare_build_root(ctx.root, settings.build_in_memory)
    if use_stage and stages.matches(template.name, key):
        with timer.step("restore-stage", lambda: "repositories and packages unchanged: installed root reused"):
            stages.restore(template.name, ctx.root)
        ctx.facts["stage"] = "reused"
    else:
        packages_done = False
        with timer.step("bootstrap"):
            packages_done = backend.bootstrap(ctx)
        with timer.step("install",
                        lambda: f"{len(template.packages)} packages" + (" (with bootstrap)" if packages_done else "")):
            if not packages_done:
                backend.install(ctx, template.packages)
            if template.get("remove_packages"):
                backend.remove(ctx, template["remove_packages"])
        if use_stage and template.customizes_root():
            with timer.step("save-stage", lambda: f"{stage_size / 1e6:.1f} MB"):
                # The stage is the root as cleaning leaves it, so it is exactly what a template without files
                # and scripts packs: for those, the cache archive itself becomes the stage (no extra packing).
                backend.clean(ctx)
                clean_root(ctx.root)
                stage_size = stages.save(template.name, ctx.root, key)
        ctx.facts["stage"] = "saved" if use_stage else "disabled"

    render_ctx = template.render_context(ctx.mirrors, ctx.native_arch)
    env = ctx.env()
    with timer.step("files", lambda: f"{nfiles} files"):
        nfiles = render_files(template, ctx.root, render_ctx)
    with timer.step("scripts", lambda: f"{nscripts} scripts"):
        nscripts = run_template_scripts(template, "pre-cache", ctx, env, inside=False)
        nscripts += run_template_scripts(template, "post-install", ctx, env, inside=True)
    with timer.step("clean"):
        clean_for_packing(template, backend, ctx, env)
    with timer.step("manifest", lambda: f"{len(packages)} packages"):
        packages = backend.installed_packages(ctx.root)
    with timer.step("pack", lambda: f"{result.packed_size / 1e6:.1f} MB"):
        result = pack_root(ctx.root, archive_tmp, settings, reporter)
    if ctx.facts["stage"] == "saved" and not template.customizes_root():
        stages.save_archive(template.name, archive_tmp, key)

    return {
        "name": template.name,
        "template_digest": template.digest(),
        "distribution": template["distribution"],
        "release": template["release"],
        "suite": template.get("suite"),
        "architecture": template["architecture"],
        "package_manager": template["package_manager"],
        "bootstrapper": backend.bootstrapper_name(ctx),
        "mirror": ctx.mirrors.get("mirror"),
        "mirrors": ctx.mirrors,
        "repositories": repo_state,
        "packages": packages,
        "template_packages": template.packages,
        "init": template.get("init", "minimal"),
        "package_count": len(packages),
        "vzpkg_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source_date_epoch": source_date_epoch(),
        "durations": timer.durations,
        "compression_level": settings.compression_level,
        "unpacked_size": result.unpacked_size,
        "packed_size": result.packed_size,
        "sha256": result.sha256,
        "archive": store.archive_path(template.name).name,
        **ctx.facts,
    }


def pack_root(root: Path, archive: Path, settings: Settings, reporter: Reporter) -> PackResult:
    """Pack the finished ROOT into ARCHIVE, with a progress bar where the reporter draws one."""
    # The root may itself be a tmpfs (build_in_memory); nothing may be mounted inside it.
    if (leftover := [m for m in mounts_below(root) if m != os.path.realpath(root)]):
        raise BuildError(f"mounts left inside the root before packing: {', '.join(leftover)}")
    progress = None
    if reporter.shows_progress():
        total = _dir_size(root)  # a walk of the whole tree: only worth it for a progress bar

        def progress(done: int) -> None:
            reporter.progress(done, total)
    try:
        return pack(root, archive, source_date_epoch=source_date_epoch(), level=settings.compression_level,
                    progress=progress)
    finally:
        reporter.progress_end()
