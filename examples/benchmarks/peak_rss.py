"""Host memory of a benchmark's processes, without JAX (the peers import it too): the peak
it reports, and the malloc policy both sides run under."""
from __future__ import annotations

import importlib.util
import pathlib
import resource

HOST_MEMORY_PY = pathlib.Path(__file__).resolve().parents[2] / "r1jax" / "host_memory.py"


def keep_freed_heap_memory() -> bool:
    """`r1jax.host_memory.keep_freed_heap_memory()`, loaded from its file so that a peer's
    process applies r1jax's malloc policy without importing r1jax (and JAX). (PyTorch runs
    its operations on the calling thread: the heap policy alone covers them.)"""
    spec = importlib.util.spec_from_file_location("_r1jax_host_memory", HOST_MEMORY_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keep_freed_heap_memory()


def add_retain_flag(parser) -> None:
    """A peer's `--retain-freed-memory` (passed by `common.peer_malloc_args`)."""
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="the malloc policy of r1jax's side (keep_freed_heap_memory)")


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark so far, in bytes: VmHWM of
    /proc/self/status, else `getrusage(RUSAGE_SELF).ru_maxrss`. VmHWM first because Linux
    keeps ru_maxrss across fork + execve, so a process started by a big parent (a benchmark's
    peer, a test runner's child) would report the parent's peak as its own."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
