"""adapters/heap.py on this machine's C library: freed memory really leaves the process."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from poolbudget.adapters import heap


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kib / 1024


def test_freed_heap_goes_back_to_the_os() -> None:
    # ~200 MiB in 1 KiB objects (above CPython's small-object limit: each is a malloc),
    # one in 64 kept so the freed ones are holes in the heap, not just its top.
    blocks = [bytes(1024) + i.to_bytes(4, "little") for i in range(200_000)]
    kept = blocks[::64]
    del blocks
    gc.collect()
    before = resident_mib()
    if not heap.release_free_memory():
        pytest.skip("this C library has no malloc_trim")
    after = resident_mib()
    print(f"resident {before:.0f} -> {after:.0f} MiB")
    assert before - after > 100, f"resident {before:.0f} -> {after:.0f} MiB"
    assert len(kept) == 3125
