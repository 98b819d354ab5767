"""update-cache: bring a cache up to date in place; generations and rollback; cleaning.

    check (status.compare) → nothing changed? done, nothing unpacked.
    lock → check-repositories → unpack (safe_unpack, beside the cache) → template changes (sources, purge, files)
         → pre-update scripts (host) → upgrade (apt-get update + dist-upgrade, or dnf upgrade --refresh)
         → install new template packages
         → post-update scripts (inside) → clean (+ post-cache scripts) → manifest (with changes) → pack
         → keep the current cache as a generation → publish (rename) → prune generations

    <cache_dir>/.generations/<name>/<N>.tar.zst + <N>.json   earlier caches, N increasing (hard links, no copy)

As in create-cache, all work happens in `.tmp-<name>-*` paths beside the cache and is published by rename; an
interrupted run publishes nothing and its leftovers are removed by the next run under the template's lock.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Settings
from ..errors import CacheNotFoundError, LockTimeoutError, UsageError, VerifyError
from ..interrupt import signals_raise
from ..lock import locked
from ..manifest.model import Manifest
from ..pkgmgr import get_backend
from ..store.archive import sha256_file
from ..store.cache import PUBLISHED_DIR, TMP_PREFIX, CacheStore, check_writable, fsync_dir, write_json_atomic
from ..store.extract import safe_unpack
from ..template import Template, TemplateRepository
from .chroot import prepare_build_root, remove_work_dir
from .pipeline import (
    DEFAULT_LOCK_TIMEOUT,
    Reporter,
    StepTimer,
    clean_for_packing,
    pack_root,
    prepare_context,
    render_files,
    run_template_scripts,
    source_date_epoch,
)
from .stage import StageStore
from .status import StatusReport, compare, template_changes

GENERATIONS_DIR = ".generations"


@dataclass
class UpdateOptions:
    keep: int = 1
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    verbose: bool = False
    refresh: bool = True  # ask the mirrors for their InRelease even when the metadata cache is fresh


# ---- generations ----------------------------------------------------------------------------------


def generations_dir(store: CacheStore, name: str) -> Path:
    return store.root / GENERATIONS_DIR / name


def list_generations(store: CacheStore, name: str) -> list[dict[str, Any]]:
    """Earlier caches of NAME kept by update-cache, newest first: generation, archive, manifest, created,
    sha256, package_count, packed_size. (For `vzpkg info`.)"""
    gdir = generations_dir(store, name)
    if not gdir.is_dir():
        return []
    out = []
    for archive in gdir.glob("*.tar.zst"):
        stem = archive.name[: -len(".tar.zst")]
        if not stem.isdigit():
            continue
        manifest_path = gdir / f"{stem}.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = {}
        if not isinstance(manifest, dict):
            manifest = {}
        out.append({"generation": int(stem), "archive": str(archive), "manifest": str(manifest_path),
                    "created": manifest.get("created"), "sha256": manifest.get("sha256"),
                    "package_count": manifest.get("package_count"), "packed_size": archive.stat().st_size})
    return sorted(out, key=lambda g: g["generation"], reverse=True)


def _link_or_copy(src: Path, dest: Path) -> None:
    # os.link() without dir_fd calls link(2), which links a symlink itself: resolve the published name first.
    src = Path(os.path.realpath(src))
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def save_generation(store: CacheStore, name: str) -> int:
    """Keep the current cache of NAME as the next generation (a hard link: no copy). Returns its number."""
    gdir = generations_dir(store, name)
    gdir.mkdir(parents=True, exist_ok=True)
    existing = [g["generation"] for g in list_generations(store, name)]
    number = max(existing, default=0) + 1
    tmp = gdir / f"{TMP_PREFIX}{number}.tar.zst.{os.getpid()}"
    try:
        _link_or_copy(store.archive_path(name), tmp)
        manifest = store.read_manifest(name)
        write_json_atomic(gdir / f"{number}.json", manifest)
        os.rename(tmp, gdir / f"{number}.tar.zst")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a copy cut short by a full disk is not left behind
        raise
    fsync_dir(gdir)
    return number


def prune_generations(store: CacheStore, name: str, keep: int) -> list[int]:
    """Remove all but the KEEP newest generations; return the numbers removed."""
    removed = []
    for gen in list_generations(store, name)[max(keep, 0):]:
        Path(gen["archive"]).unlink(missing_ok=True)
        Path(gen["manifest"]).unlink(missing_ok=True)
        removed.append(gen["generation"])
    gdir = generations_dir(store, name)
    if gdir.is_dir() and not any(gdir.iterdir()):
        gdir.rmdir()
    return removed


def publish_update(store: CacheStore, name: str, archive_tmp: Path, manifest: dict[str, Any], keep: int,
                   reporter: Reporter) -> tuple[int | None, list[int]]:
    """Keep the current cache as a generation, publish the new one, prune: (generation kept, generations pruned).

    A current cache that does not match its manifest is neither kept as a generation nor a reason to prune the
    earlier ones: the newest generation that verifies survives every update."""
    generation = None
    sound = store.matches_manifest(name)
    if not sound:
        reporter.note(f"the replaced cache of {name} did not match its manifest: not kept as a generation, "
                      f"earlier generations kept")
    elif keep > 0:
        generation = save_generation(store, name)
    store.publish(name, archive_tmp, manifest)
    return generation, (prune_generations(store, name, keep) if sound else [])


def _clean_generation_leftovers(store: CacheStore, name: str) -> list[Path]:
    gdir = generations_dir(store, name)
    removed = []
    if gdir.is_dir():
        for p in gdir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def rollback_cache(name: str, settings: Settings, *, generation: int | None = None,
                   lock_timeout: float = DEFAULT_LOCK_TIMEOUT, reporter: Reporter | None = None) -> dict[str, Any]:
    """Put generation GENERATION (default: the newest) of NAME back as its cache; the replaced cache is dropped.

    The generation's archive is checked against its manifest's sha256 before it is published."""
    reporter = reporter or Reporter()
    store = CacheStore(settings.cache_dir)
    check_writable(settings.cache_dir)
    with signals_raise(), locked(settings.lock_dir / f"{name}.lock", timeout=lock_timeout,
                                  what=f"template {name}", on_wait=reporter.note):
        store.clean_leftovers(name)
        _clean_generation_leftovers(store, name)
        gens = list_generations(store, name)
        if not gens:
            raise CacheNotFoundError(f"template {name!r} has no earlier generation in {generations_dir(store, name)} "
                                     f"to roll back to (update-cache keeps them: --keep N)")
        if generation is None:
            gen = gens[0]
        else:
            gen = next((g for g in gens if g["generation"] == generation), None)
            if gen is None:
                raise CacheNotFoundError(f"template {name!r} has no generation {generation} "
                                         f"(have: {', '.join(str(g['generation']) for g in gens)})")
        archive, manifest_path = Path(gen["archive"]), Path(gen["manifest"])
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise VerifyError(f"generation {gen['generation']} of {name}: manifest {manifest_path} unreadable ({e})") from e
        if not isinstance(manifest, dict):
            raise VerifyError(f"generation {gen['generation']} of {name}: manifest {manifest_path} is not a JSON "
                              f"object; not restored")
        digest = sha256_file(archive)
        if digest != manifest.get("sha256"):
            raise VerifyError(f"generation {gen['generation']} of {name}: {archive} sha256 {digest[:16]}... does not "
                              f"match its manifest; not restored")
        tmp = store.temp_path(name, "rollback")
        try:
            _link_or_copy(archive, tmp)
            store.publish(name, tmp, manifest)
        finally:
            tmp.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)
        prune_generations(store, name, keep=len(gens))  # removes the directory when it is empty
        reporter.note(f"rolled {name} back to generation {gen['generation']} (created {manifest.get('created')})")
        return {**manifest, "restored_generation": gen["generation"]}


# ---- update-cache -----------------------------------------------------------------------------------


def _versions(packages: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(name, architecture) → version; for rpm the full epoch:version-release (`evr`), several installed
    versions (installonly packages such as kernels) joined with ', '."""
    out: dict[tuple[str, str], list[str]] = {}
    for p in packages:
        out.setdefault((p["name"], p.get("architecture", "")), []).append(p.get("evr") or p["version"])
    return {k: ", ".join(sorted(v)) for k, v in out.items()}


def _package_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, str | None]]:
    before = _versions(old)
    after = _versions(new)
    changes: list[dict[str, str | None]] = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append({"name": key[0], "architecture": key[1], "from": before.get(key), "to": after.get(key)})
    return changes


def update_cache(name: str, settings: Settings, options: UpdateOptions | None = None,
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """Update the cache of template NAME when its repositories or definition changed.

    Returns {name, updated: bool, reason, status, manifest (when updated), changes, generation, durations}."""
    options = options or UpdateOptions()
    reporter = reporter or Reporter()
    if options.keep < 0:
        raise UsageError(f"--keep {options.keep}: must be 0 or more")
    started = time.monotonic()
    template = TemplateRepository(settings.template_dirs).load(name)
    store = CacheStore(settings.cache_dir)
    manifest = store.read_manifest(name)
    check_writable(settings.cache_dir)
    status = compare(template, Manifest.from_dict(manifest), settings, refresh=options.refresh)
    if status.current:
        return {"name": name, "updated": False, "reason": _current_reason(status), "status": status.to_dict(),
                "durations": {"total": round(time.monotonic() - started, 3)}}

    timer = StepTimer(reporter)
    with signals_raise(), locked(settings.lock_dir / f"{name}.lock", timeout=options.lock_timeout,
                                  what=f"template {name}", on_wait=reporter.note):
        for leftover in store.clean_leftovers(name) + _clean_generation_leftovers(store, name):
            reporter.note(f"removed leftover of an interrupted run: {leftover}")
        fresh = store.read_manifest(name)
        if fresh.get("sha256") != manifest.get("sha256"):  # another run published meanwhile: look again
            manifest = fresh
            status = compare(template, Manifest.from_dict(manifest), settings, refresh=False)
            if status.current:
                return {"name": name, "updated": False, "reason": "another run just updated it",
                        "status": status.to_dict(),
                        "durations": {"total": round(time.monotonic() - started, 3)}}
        work_dir = store.temp_path(name, "update")
        archive_tmp = store.temp_path(name, "archive")
        work_dir.mkdir()
        try:
            new_manifest = _update(template, settings, options, reporter, timer, store, manifest, work_dir, archive_tmp)
            with timer.step("publish"):
                new_manifest["durations"] = timer.durations
                new_manifest["durations"]["total"] = round(time.monotonic() - started, 3)
                generation, pruned = publish_update(store, name, archive_tmp, new_manifest, options.keep, reporter)
            if generation is not None:
                reporter.note(f"previous cache kept as generation {generation} "
                              f"(vzpkg rollback-cache {name})")
            for number in pruned:
                reporter.verbose(f"removed generation {number} (--keep {options.keep})")
            return {"name": name, "updated": True, "reason": _change_reason(status), "status": status.to_dict(),
                    "manifest": new_manifest, "changes": new_manifest["changes"], "generation": generation,
                    "durations": new_manifest["durations"]}
        finally:
            remove_work_dir(work_dir)
            archive_tmp.unlink(missing_ok=True)


def _current_reason(status: StatusReport) -> str:
    changed = status.changed_repositories()
    if changed:
        return (f"up to date: repository metadata changed ({', '.join(changed)}) but no installed package "
                f"has a newer version; definition unchanged")
    return "up to date: repositories and template definition unchanged since the cache was built"


def _change_reason(status: StatusReport) -> str:
    parts = []
    if status.updates:
        parts.append(f"{len(status.updates)} package updates")
    if status.template_changed:
        parts.append("template definition changed")
    return ", ".join(parts)


def _update(template: Template, settings: Settings, options: UpdateOptions, reporter: Reporter, timer: StepTimer,
            store: CacheStore, manifest: dict[str, Any], work_dir: Path, archive_tmp: Path) -> dict[str, Any]:
    ctx = prepare_context(template, settings, work_dir, options.verbose, reporter)
    backend = get_backend(template["package_manager"])
    # The signatures are checked again here, under the lock, right before anything is installed.
    with timer.step("check-repositories", lambda: f"{len(repo_state)} repositories verified"):
        repo_state = backend.check_repositories(ctx)

    ctx.facts["build_in_memory"] = prepare_build_root(ctx.root, settings.build_in_memory)
    with timer.step("unpack", lambda: f"{members} members"):
        members = safe_unpack(store.archive_path(template.name), ctx.root, note=reporter.verbose)

    plan = template_changes(template, Manifest.from_dict(manifest))
    definition_changed = manifest.get("template_digest") != template.digest()
    env = ctx.env()
    with timer.step("template-changes", lambda: f"{len(plan['remove'])} to purge" +
                    (", definition changed" if definition_changed else "")):
        if backend.write_repositories(ctx):
            reporter.verbose("repositories changed: the root's repository configuration was rewritten")
        if plan["remove"]:
            backend.remove(ctx, plan["remove"])
        if definition_changed:
            render_files(template, ctx.root, template.render_context(ctx.mirrors, ctx.native_arch))
    with timer.step("pre-update", lambda: f"{npre} scripts"):
        npre = run_template_scripts(template, "pre-update", ctx, env, inside=False)
    with timer.step("upgrade", lambda: f"{len(plan['install'])} new packages" if plan["install"] else ""):
        backend.upgrade(ctx)
        if plan["install"]:
            backend.install(ctx, plan["install"])
    with timer.step("post-update", lambda: f"{npost} scripts"):
        npost = run_template_scripts(template, "post-update", ctx, env, inside=True)
    with timer.step("clean"):
        clean_for_packing(template, backend, ctx, env)
    with timer.step("manifest", lambda: f"{len(changes)} changes"):
        packages = backend.installed_packages(ctx.root)
        changes = _package_changes(manifest.get("packages", []), packages)
    with timer.step("pack", lambda: f"{result.packed_size / 1e6:.1f} MB"):
        result = pack_root(ctx.root, archive_tmp, settings, reporter)

    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {
        **manifest,
        "template_digest": template.digest(),
        "template_packages": template.packages,
        "mirror": ctx.mirrors.get("mirror"),
        "mirrors": ctx.mirrors,
        "repositories": repo_state,
        "packages": packages,
        "package_count": len(packages),
        "vzpkg_version": __version__,
        "created": now,
        "updated_from": {"sha256": manifest.get("sha256"), "created": manifest.get("created")},
        "changes": changes,
        "source_date_epoch": source_date_epoch(),
        "unpacked_size": result.unpacked_size,
        "packed_size": result.packed_size,
        "sha256": result.sha256,
        "archive": store.archive_path(template.name).name,
        **{k: v for k, v in ctx.facts.items() if k != "bootstrapper"},
    }


# ---- clean --------------------------------------------------------------------------------------------

_LEFTOVER_RE = re.compile(r"^\.tmp-(?P<name>.+?)(?:-[a-z]+-\d+|\.json\.\d+|\.json-link-\d+|\.tar\.zst-link-\d+)$")


def _path_size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if st.st_nlink > 1:  # hard links (package cache, generations) count once
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def clean(settings: Settings, *, packages: bool, metadata: bool, generations: bool, stages: bool = False,
          names: list[str] | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Free space: the package cache, the metadata cache, generations, build stages; always leftovers of dead
    runs (a leftover whose template lock is held belongs to a live run and is kept)."""
    reporter = reporter or Reporter()
    store = CacheStore(settings.cache_dir)
    report: dict[str, Any] = {"freed": 0, "removed": [], "skipped": []}

    def _remove(path: Path) -> None:
        size = _path_size(path)
        if path.is_dir() and not path.is_symlink():
            remove_work_dir(path)
        else:
            path.unlink(missing_ok=True)
        report["freed"] += size
        report["removed"].append(str(path))

    # Leftovers of interrupted runs, each under its template's lock (not waiting: held = in use).
    by_name: dict[str, list[Path]] = {}
    if store.root.is_dir():
        for p in store.root.iterdir():
            m = _LEFTOVER_RE.match(p.name)
            if m and (names is None or m.group("name") in names):
                by_name.setdefault(m.group("name"), []).append(p)
    gen_root = store.root / GENERATIONS_DIR
    gen_names = sorted(p.name for p in gen_root.iterdir() if p.is_dir()) if gen_root.is_dir() else []
    pub_root = store.root / PUBLISHED_DIR
    pub_names = {p.name for p in pub_root.iterdir() if p.is_dir() and store.leftovers(p.name)} \
        if pub_root.is_dir() else set()
    for name in sorted(set(by_name) | pub_names | (set(gen_names) if generations else set())):
        if names is not None and name not in names:
            continue
        try:
            with locked(settings.lock_dir / f"{name}.lock", timeout=0, what=f"template {name}"):
                for p in by_name.get(name, []):
                    _remove(p)
                for p in store.leftovers(name):
                    if p.exists() or p.is_symlink():
                        _remove(p)
                for p in _clean_generation_leftovers(store, name):
                    report["removed"].append(str(p))
                if generations:
                    for gen in list_generations(store, name):
                        report["freed"] += Path(gen["archive"]).stat().st_size
                        report["removed"].append(gen["archive"])
                    prune_generations(store, name, keep=0)
        except LockTimeoutError:
            report["skipped"].append(name)
            reporter.note(f"{name}: in use by another vzpkg run, its work files and generations were left alone")
    if gen_root.is_dir() and not any(gen_root.iterdir()):
        gen_root.rmdir()
    if packages and settings.package_cache_dir.exists():
        _remove(settings.package_cache_dir)
    if metadata and settings.metadata_cache_dir.exists():
        _remove(settings.metadata_cache_dir)
    if stages:
        freed = StageStore(settings.cache_dir).remove_all(names)
        report["freed"] += freed
    return report
