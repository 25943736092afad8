"""keep_freed_memory: a 16 MiB block comes from the heap and stays there once freed (glibc),
where by default it is its own mapping, returned to the kernel (and faulted in again) at free."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from ares.runtime.allocator import keep_freed_memory
    keep_freed_memory()
block = bytearray(16 << 20)
held = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"mapped_while_held": held.hblkhd, "free_kept": freed.fordblks}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_large_blocks_come_from_the_heap_and_are_kept_after_free():
    default, keep = probe("default"), probe("keep")
    assert default["mapped_while_held"] >= 16 << 20 and default["free_kept"] < 16 << 20
    assert keep["mapped_while_held"] < 16 << 20 and keep["free_kept"] >= 16 << 20
