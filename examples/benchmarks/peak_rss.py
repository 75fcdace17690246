"""The peak host memory a benchmark reports, without JAX (the peers import it too)."""
from __future__ import annotations

import pathlib
import resource


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
