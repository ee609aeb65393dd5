"""The glibc heap settings of PyTorch processes (model_export/heap.py), observed through mallinfo2."""

import ctypes
import os
import platform
import subprocess
import sys

import pytest

from model_export import heap

# In a fresh interpreter: malloc and free a 16 MB block; print the bytes it added to mmap'ed memory
# while held, and the heap's size after it is freed.
PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "retain":
    from model_export.heap import retain_freed_memory
    assert retain_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(16 << 20)
held = libc.mallinfo2()
libc.free(block)
print(held.hblkhd - before.hblkhd, libc.mallinfo2().arena)
"""


def _probe(mode: str) -> tuple[int, int]:
    glibc_defaults = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}  # no tunables from the caller
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True, env=glibc_defaults).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_freed_buffers_stay_in_the_heap_for_the_next_step():
    mapped, heap_after_free = _probe("default")
    assert mapped >= 16 << 20 and heap_after_free < 16 << 20  # glibc's default: mmap'ed, then returned to the OS
    mapped, heap_after_free = _probe("retain")
    assert mapped == 0 and heap_after_free >= 16 << 20  # from the heap, and kept there


def test_without_glibc_nothing_is_changed_and_nothing_raises(monkeypatch):
    def no_libc(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert heap.retain_freed_memory() is False
