"""Publish a prepared archive as cache NAME: `python publish_driver.py CACHE_DIR NAME ARCHIVE MANIFEST_JSON`.

Run by test_publish.py under strace (killed at a chosen fsync or rename, or failing a write with ENOSPC). It
copies ARCHIVE to the work name a build would leave (unless it is one already), then calls CacheStore.publish, as create-cache does.
Exit 0: published; 15: DiskFullError; anything else is a failure the test reports.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from vzpkg.errors import VzError
from vzpkg.store.cache import CacheStore


def main() -> int:
    cache_dir, name, archive, manifest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    store = CacheStore(cache_dir)
    # An archive already beside the cache (a `.tmp-` work name) is published as it is: nothing to copy.
    tmp = archive if archive.name.startswith(".tmp-") else store.temp_path(name, "archive")
    try:
        if tmp != archive:
            shutil.copyfile(archive, tmp)
        store.publish(name, tmp, json.loads(manifest))
    except VzError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        tmp.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
