import platform
import resource

import pytest
import torch

from fusedserve.engine.host_memory import keep_large_blocks_in_heap

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _minor_faults_of_repeated_large_tensors(repeats: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.ones(8 << 20, dtype=torch.float32)  # 32 MiB: above glibc's largest default mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_freed_large_tensors_are_reused_without_page_faults():
    assert keep_large_blocks_in_heap()
    # The first ones grow the heap until freed blocks coalesce into a reusable steady state (a few dozen at most).
    _minor_faults_of_repeated_large_tensors(40)
    pages_per_tensor = (32 << 20) // resource.getpagesize()
    # With the default thresholds every repeat faults all 8,192 pages in again; reused heap blocks fault none.
    assert _minor_faults_of_repeated_large_tensors(10) < pages_per_tensor
