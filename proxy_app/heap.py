"""Large buffers are given back to the operating system as soon as they are freed.

glibc's malloc serves a request above its mmap threshold with a mapping of its own,
unmapped at free; but after such a free it raises the threshold to that size (up to
32 MiB), and from then on buffers of that size come from the heaps of the threads that
asked. The cache's largest buffers are an S3 upload's 8 MiB parts (read in executor
threads) and its 1 MiB store reads; once on those heaps, a freed part leaves a hole that
a heap only returns when it is at its top, and every executor thread has a heap. A cache
node with a bucket peaked at 182-226 MB with 30 clients on 3 nodes; with the threshold
fixed, 150-180 MB (`python -m bench --only cluster`, figure C5).

Fixed at 4 MiB: the 1 MiB reads, taken again and again at the highest rate, stay on the
heap (a mapping per read would cost page faults on every megabyte served); the parts
are mapped and unmapped. Setting the threshold also stops glibc moving it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
LARGE = 4 << 20


def map_large_buffers(threshold: int = LARGE) -> bool:
    """Fixes glibc's mmap threshold; False (and nothing changed) on another libc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the heap keeps its own threshold")
    return done
