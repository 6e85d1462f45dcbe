"""``keep_freed_memory``: freed CPU memory stays in the process instead of going back to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medir_monai.allocator import keep_freed_memory

# allocate, touch and free a 64 MiB tensor; print whether the setting was applied and how much of the 64 MiB left
# the resident set when the tensor was freed (glibc's default maps a block this large on its own and unmaps it)
PROBE = """
import os, sys, torch
from medir_monai.allocator import keep_freed_memory
applied = keep_freed_memory(sys.argv[1] == "keep")
def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
x = torch.empty(64 * 2**20 // 4)
x.fill_(1.0)
before = resident_mib()
del x
print(applied, before - resident_mib())
"""


def _probe(mode: str) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1"}
    ).stdout.split()
    return out[0] == "True", float(out[1])


def test_off_changes_nothing():
    assert keep_freed_memory(False) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_in_the_process():
    applied, released_kept = _probe("keep")
    default_applied, released_default = _probe("default")
    assert applied and not default_applied
    assert released_default > 60  # glibc's default hands the 64 MiB back (and maps it afresh next time)
    assert released_kept < 4
