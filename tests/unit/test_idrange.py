"""The per-VE id range allocator (vzpkg/runtime/idrange.py) on a fake VZ root: no root needed."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from vzpkg.errors import VEError
from vzpkg.runtime import idrange
from vzpkg.runtime import layout as L

R = L.ID_RANGE
P = idrange.POOL_START


def test_lowest_free_blocks():
    assert idrange.lowest_free([]) == P
    assert idrange.lowest_free([(100000, 165536)]) == P, "the shared range is below the pool"
    assert idrange.lowest_free([(P, P + R)]) == P + R
    assert idrange.lowest_free([(P + R, P + 2 * R)]) == P, "a hole is reused"
    # a hand-chosen, unaligned range blocks every block it touches
    assert idrange.lowest_free([(P + R + 5, P + 2 * R + 5)]) == P
    assert idrange.lowest_free([(P, P + R), (P + R + 5, P + 2 * R + 5)]) == P + 3 * R
    # ranges given in any order, overlapping each other
    assert idrange.lowest_free([(P + R, P + 2 * R), (P, P + 10), (P + 5, P + R + 1)]) == P + 2 * R
    # the pool's end
    assert idrange.lowest_free([], P, P + R) == P
    assert idrange.lowest_free([(P, P + 1)], P, P + 2 * R - 1) is None


def _layout(tmp_path, shifts: dict[str, str]) -> L.Layout:
    lay = L.Layout(tmp_path)
    lay.conf_dir.mkdir(parents=True)
    for veid, shift in shifts.items():
        (lay.conf_dir / f"{veid}.conf").write_text(f'OSTEMPLATE="x"\nID_SHIFT="{shift}"  # comment\n')
    return lay


def test_configs_and_host_subids_are_skipped(tmp_path):
    lay = _layout(tmp_path / "vz", {"101": str(P), "102": "100000", "103": str(P + 2 * R)})
    (lay.conf_dir / "bad.conf").write_text('ID_SHIFT="oops"\n')
    subuid = tmp_path / "subuid"
    subgid = tmp_path / "subgid"
    # root's own delegation is for root's containers (ours); alice's range is hers
    subuid.write_text(f"root:{P}:1000000000\nalice:{P + R}:65536\n# junk\nbroken\n")
    subgid.write_text(f"bob:{P + 3 * R}:10\n")
    with idrange.reserve(lay, "104", subid_files=(subuid, subgid)) as shift:
        assert shift == P + 4 * R
        assert (lay.lock_dir / "idrange" / "104").read_text().strip() == str(shift)
    assert not (lay.lock_dir / "idrange" / "104").exists(), "the reservation ends with the block"
    # no subid files at all
    with idrange.reserve(lay, "105", subid_files=(tmp_path / "none",)) as shift:
        assert shift == P + R


def test_reservations_in_progress_count_and_stale_ones_do_not(tmp_path):
    lay = _layout(tmp_path, {})
    none = (tmp_path / "none",)
    with idrange.reserve(lay, "a", subid_files=none) as a:
        with idrange.reserve(lay, "b", subid_files=none) as b:
            assert (a, b) == (P, P + R)
    # a reservation whose creator died (file left, lock not held) is ignored and removed
    stale = lay.lock_dir / "idrange" / "dead"
    stale.write_text(f"{P}\n")
    with idrange.reserve(lay, "c", subid_files=none) as c:
        assert c == P
    assert not stale.exists()


def test_exhausted_pool_is_a_clear_error(tmp_path, monkeypatch):
    lay = _layout(tmp_path, {"1": str(P)})
    monkeypatch.setattr(idrange, "POOL_END", P + R)
    with pytest.raises(VEError, match="no free id range.*--idmap shared"):
        with idrange.reserve(lay, "2", subid_files=(tmp_path / "none",)):
            pass


def _create_like_vzctl(root: str, veid: str, out) -> None:
    lay = L.Layout(root)
    with idrange.reserve(lay, veid, subid_files=()) as shift:
        time.sleep(0.05)  # a create's work between allocation and saving the config
        tmp = lay.conf(veid).with_suffix(".tmp")
        tmp.write_text(f'ID_SHIFT="{shift}"\n')
        os.rename(tmp, lay.conf(veid))
    out.put(shift)


def test_concurrent_allocations_are_distinct(tmp_path):
    lay = _layout(tmp_path, {})
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_create_like_vzctl, args=(str(tmp_path), f"v{i}", out)) for i in range(6)]
    for p in procs:
        p.start()
    shifts = sorted(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join()
    assert shifts == [P + i * R for i in range(6)]
    assert len(lay.veids()) == 6


def test_templates_in_use_by_private_ves(tmp_path):
    lay = _layout(tmp_path, {})
    sha1, sha2, sha3 = "a" * 64, "b" * 64, "c" * 64
    (lay.conf_dir / "1.conf").write_text(f'TEMPLATE_SHA256="{sha1}"\nID_SHIFT="{P}"\nIDMAP="private"\n')
    (lay.conf_dir / "2.conf").write_text(f'TEMPLATE_SHA256="{sha2}"\nID_SHIFT="{P}"\nIDMAP="shared"\n')
    (lay.conf_dir / "3.conf").write_text(f'TEMPLATE_SHA256="{sha3}"\nID_SHIFT="0"\nPRIVILEGED="yes"\n')
    # a private VE uses the generation unpacked at the shared shift, not one at its own ID_SHIFT
    assert L.templates_in_use(lay) == {sha1, f"{sha2}-{P}", f"{sha3}-0"}
    assert L.template_shift(False, P, "private") == L.DEFAULT_ID_SHIFT
    assert L.template_shift(False, P, None) == P
    assert L.template_shift(True, P, "private") == 0
