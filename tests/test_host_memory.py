"""r1jax.host_memory: freed host memory is reused without page faults."""
import platform
import subprocess
import sys

import pytest

# In a child process: the policy is process-wide and would outlive the test here.
CHILD = """
import resource, sys
import numpy as np
if sys.argv[1] == "retain":
    import jax
    from r1jax.host_memory import retain_freed_memory
    assert retain_freed_memory() and not jax.config.read("jax_cpu_enable_async_dispatch")

def faults_of_a_fresh_buffer(nbytes=256 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(nbytes, np.uint8)  # malloc'd, every page written
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

first, second = faults_of_a_fresh_buffer(), faults_of_a_fresh_buffer()
print(first, second)
"""


def faults(policy: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True,
                         check=True).stdout
    first, second = map(int, out.split())
    return first, second


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="a glibc malloc policy")
def test_freed_buffers_are_reused_without_page_faults():
    # (fault counts, not pages: numpy asks for transparent huge pages where it can)
    first, second = faults("default")
    assert first > 0 and second > first / 2  # glibc mmaps and unmaps big buffers
    first, second = faults("retain")
    assert first > 0 and second < first / 10  # the heap grows once, the next buffer reuses it
