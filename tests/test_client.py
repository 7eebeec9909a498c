"""cdmfs.mounted() never leaks a mount: what is still open at the end is detached, with a warning."""
from __future__ import annotations

import os
import time
import warnings

import pytest

import cdmfs
from cdmfs.fs.daemon import daemon_pid, is_mounted


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_mapping_left_open_is_detached_with_a_warning():
    with pytest.warns(cdmfs.BusyMountWarning) as caught:
        with cdmfs.mounted() as m:
            r = m.region("buf", 1 << 20)
            mm = r.mmap()
            mm[:5] = b"hello"
            path, pid = m.path, daemon_pid(m.path)
    try:
        (w,) = caught
        text = str(w.message)
        assert text.startswith(f"{path} was still in use, detached it (umount -l): ")
        assert f"(pid {os.getpid()}) has open regions/buf/data, maps regions/buf/data" in text
        assert w.filename == __file__          # points at the with-statement
        assert not is_mounted(path)            # no mount left in /proc/self/mounts
        assert not os.path.exists(path)        # nor its folder
        assert os.path.exists(f"/proc/{pid}")  # the daemon still serves the mapping
        assert mm[:5] == b"hello"
    finally:
        mm.close()
    assert wait_gone(pid), "the daemon outlived the last mapping"


def test_clean_exit_warns_nothing_and_leaves_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with cdmfs.mounted() as m:
            r = m.region("buf", 1 << 20)
            with r.mmap() as mm:
                mm[:5] = b"hello"
            with open(r.data, "rb") as f:
                assert f.read(5) == b"hello"
            path, pid = m.path, daemon_pid(m.path)
            assert m.log_file and m.log_file.endswith(".log")
    assert not is_mounted(path) and not os.path.exists(path)
    assert wait_gone(pid)


def test_an_exception_in_the_block_still_unmounts():
    here = os.getcwd()
    with pytest.raises(ZeroDivisionError), pytest.warns(cdmfs.BusyMountWarning) as caught:
        with cdmfs.mounted() as m:
            path, pid = m.path, daemon_pid(m.path)
            f = open(m.region("r", 4096).data, "rb")
            os.chdir(os.path.join(m.path, "regions"))
            1 / 0
    try:
        text = str(caught[0].message)
        assert "has its working directory in regions, has open regions/r/data" in text, text
        assert not is_mounted(path)
    finally:
        f.close()
        os.chdir(here)
    assert wait_gone(pid)


def test_parse_migrate_single_pages_and_runs():
    from cdmfs.client import parse_migrate
    text = "requested 8\nmigrated 3\nskipped 5\npage 1 -EBUSY\npages 4-6 -ENOMEM\npage 7 -EIO\n"
    assert parse_migrate(text) == {"requested": 8, "migrated": 3, "skipped": 5,
                                   "holes": [(1, 1, "-EBUSY"), (4, 6, "-ENOMEM"), (7, 7, "-EIO")]}
    assert parse_migrate("requested 2\nmigrated 2\nskipped 0\n")["holes"] == []


def test_pagemap_bits_agree_with_the_core():
    """The client decodes pagemap with its own copy of the kernel's values (its
    layer does not load the C core); they are the core's, native/cdmcore.h."""
    from cdmfs import client
    from cdmfs._core import lib
    for name, core_name in (("PM_PFN_MASK", "CDM_PM_PFN_MASK"),
                            ("PM_MMAP_EXCLUSIVE", "CDM_PM_MMAP_EXCLUSIVE"),
                            ("PM_FILE", "CDM_PM_FILE"), ("PM_SWAP", "CDM_PM_SWAP"),
                            ("PM_PRESENT", "CDM_PM_PRESENT"),
                            ("MAX_SWAPFILES_SHIFT", "CDM_MAX_SWAPFILES_SHIFT"),
                            ("SWP_HWPOISON", "CDM_SWP_HWPOISON"),
                            ("SWP_DEVICE_WRITE", "CDM_SWP_DEVICE_WRITE")):
        assert getattr(client, name) == getattr(lib, core_name), name


def test_pagemap_decoding():
    from cdmfs.client import pagemap_pfn, pagemap_swap_type
    present = (1 << 63) | (1 << 56) | 0x40001
    private = (1 << 62) | 0x80000 << 5 | 28
    poisoned = (1 << 62) | 0x8001 << 5 | 24
    assert [pagemap_pfn(e) for e in (present, private, poisoned, 0)] == [0x40001, 0x80000, 0x8001, None]
    assert [pagemap_swap_type(e) for e in (present, private, poisoned, 0)] == [None, 28, 24, None]
    assert pagemap_pfn(1 << 62) == 0 and pagemap_swap_type(1 << 62) == 0    # unprivileged: no frame field
