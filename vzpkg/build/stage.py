"""The build-stage cache: the root as it was right after its packages were installed.

Like mkosi's incremental mode: when neither the repositories (their signed metadata digests) nor the template's
package inputs changed since the last build, the installed root is restored from this stage instead of being
bootstrapped again, and only files, scripts, cleaning and packing run. Any change in a repository's InRelease
(or repomd), the package list, variant, keyring or vzpkg version gives another key, and a full build.

The stage is the root after package installation and cleaning. For a template without files or build scripts
that is exactly what gets packed, so the cache archive itself is hard-linked as the stage and saving costs
nothing; otherwise the stage is packed separately (fast zstd level). One stage per template (the latest), under
<cache_dir>/.stages/. Disable with --no-stage-cache or VZPKG_STAGE_CACHE=0.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__, process
from ..errors import BuildError
from ..store.archive import open_decompressed, pack
from ..store.cache import TMP_PREFIX, fsync_dir

STAGE_LEVEL = 1  # the stage is read back once or twice: favour packing speed over size
_INPUT_KEYS = ("distribution", "release", "suite", "architecture", "package_manager", "variant", "merged_usr",
               "packages", "remove_packages", "releasever", "weak_dependencies", "gpg_keys", "keyring")


def enabled() -> bool:
    return os.environ.get("VZPKG_STAGE_CACHE", "1") not in ("0", "no", "false")


def stage_key(template_data: dict[str, Any], repositories: list[Any], repo_state: list[dict[str, Any]],
              bootstrapper: str, source_date_epoch: int | None = None) -> str:
    inputs = {
        # A stage taken from a packed archive carries mtimes clamped to the epoch it was packed with.
        "source_date_epoch": source_date_epoch,
        "vzpkg": __version__,
        "bootstrapper": bootstrapper,
        "template": {k: template_data.get(k) for k in _INPUT_KEYS},
        "repositories": repositories,
        "repository_state": repo_state,
    }
    keyring = template_data.get("keyring")
    if keyring and Path(keyring).is_file():
        inputs["keyring_sha256"] = hashlib.sha256(Path(keyring).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class StageStore:
    def __init__(self, cache_dir: Path) -> None:
        self.dir = cache_dir / ".stages"

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.tar.zst", self.dir / f"{name}.key"

    def matches(self, name: str, key: str) -> bool:
        archive, key_file = self._paths(name)
        return archive.is_file() and key_file.is_file() and key_file.read_text().strip() == key

    def restore(self, name: str, root: Path) -> None:
        """Unpack the stage into ROOT (our own archive: GNU tar restores owners, modes and xattrs)."""
        archive, _ = self._paths(name)
        root.mkdir(parents=True, exist_ok=True)
        with process.spawn(["tar", "--extract", "--file=-", f"--directory={root}", "--numeric-owner",
                            "--same-permissions", "--xattrs", "--xattrs-include=*"],
                           stdin=process.PIPE, stderr=process.PIPE, what="restoring the build stage") as proc:
            assert proc.stdin is not None and proc.stderr is not None
            try:
                with open_decompressed(archive) as stream:
                    while chunk := stream.read(1 << 20):
                        proc.stdin.write(chunk)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            finally:
                err = proc.stderr.read().decode(errors="replace").strip()
                if proc.wait() != 0:
                    raise BuildError(f"restoring the build stage {archive} failed: {err}; "
                                     f"rebuild without it: --no-stage-cache")

    def save(self, name: str, root: Path, key: str) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        archive, key_file = self._paths(name)
        tmp = self.dir / f"{TMP_PREFIX}{name}.{os.getpid()}"
        try:
            result = pack(root, tmp, level=STAGE_LEVEL)
            os.rename(tmp, archive)
            key_file.write_text(key + "\n")
            fsync_dir(self.dir)
        finally:
            tmp.unlink(missing_ok=True)
        return result.packed_size

    def save_archive(self, name: str, archive: Path, key: str) -> None:
        """Make an archive packed from the stage root itself the stage: a hard link, no copy."""
        self.dir.mkdir(parents=True, exist_ok=True)
        target, key_file = self._paths(name)
        tmp = self.dir / f"{TMP_PREFIX}{name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(archive, tmp)
        except OSError:
            return  # another filesystem: do without a stage rather than copy 40 MB
        os.rename(tmp, target)
        key_file.write_text(key + "\n")
        fsync_dir(self.dir)

    def remove_all(self, names: list[str] | None = None) -> int:
        """Remove the stages of NAMES, or every stage; return the bytes freed."""
        if names is None:
            return self.remove()
        return sum(self.remove(name) for name in names)

    def remove(self, name: str | None = None) -> int:
        """Remove one template's stage, or all; return the bytes freed."""
        freed = 0
        if not self.dir.is_dir():
            return 0
        for path in list(self.dir.iterdir()):
            if name is None or path.name.startswith(f"{name}.") or path.name.startswith(f"{TMP_PREFIX}{name}."):
                freed += path.stat().st_size
                path.unlink()
        return freed
