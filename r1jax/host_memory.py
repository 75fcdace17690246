"""Host memory that XLA:CPU frees stays in the process, ready for the next step.

XLA:CPU allocates the temporary buffer of each run of a compiled step (every activation
kept for the backward pass: 7.6 GB for a GRPO update of bench-small Qwen2 over 64 rows of
192 tokens) with one `malloc`, which glibc serves with a fresh `mmap` and gives back with
`munmap` when the run ends. The next run then faults every page in again and the kernel
zeroes each one: 1.9 million page faults per update step. In a virtual machine that
returns free memory to its host the pages come back slower still: the update took 20 s
run back to back and 24-25 s after a 10 s pause (the generation phase of a GRPO step is
such a pause). In `examples/benchmarks/grpo_step.py`, run alternately in one window, the
update took 24.5-24.8 s without `retain_freed_memory()` and 17.3 s with it, where fewer
than a tenth of the faults remain.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_heap_memory() -> bool:
    """glibc's malloc serves large blocks from the heap instead of `mmap` and never trims
    the heap, so freed memory stays in the process for reuse. This covers the main
    thread's allocations: other threads' arenas still `mmap` large blocks. Returns False,
    changing nothing, where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = [libc.mallopt(_M_MMAP_MAX, 0), libc.mallopt(_M_TRIM_THRESHOLD, -1)]  # -1: SIZE_MAX
    return all(ok == 1 for ok in applied)


def retain_freed_memory() -> bool:
    """`keep_freed_heap_memory()`, and JAX's CPU computations run on the calling thread
    (`jax_cpu_enable_async_dispatch` off), so that their buffers come from that heap too.
    (Putting every thread on the main heap instead, `M_ARENA_MAX=1`, made the sampler about
    10% slower: its decode loop's threads then contend for one lock.)

    Call it at the start of a program, before JAX runs anything. The process's resident
    memory then stays at its high-water mark, and Python no longer runs ahead of CPU
    computations. Returns whether the malloc policy applied (glibc only).
    """
    if not keep_freed_heap_memory():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
