"""heap.map_large_buffers: glibc takes the fixed mmap threshold (Debian, the target)."""

from __future__ import annotations

import platform

from proxy_app.heap import map_large_buffers


def test_glibc_takes_the_threshold() -> None:
    assert platform.libc_ver()[0] == "glibc"
    assert map_large_buffers() is True
    assert map_large_buffers(1 << 20) is True  # may be set again (the tests' processes)
