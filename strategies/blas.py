"""BLAS on one thread for the server's passes over model updates.

Checking and folding an update are bound by memory, not arithmetic: OpenBLAS handing each
pass to two threads on a busy machine made a round up to 30 times slower. `one_blas_thread`
limits BLAS to one thread for a block; setting the limit costs about 11 µs, so nested
blocks (a reply checked, then folded) reuse the outermost one's. Blocks are counted per
thread: the server checks and folds replies under one lock. (OpenBLAS's limit set in one
thread and restored from another does not come back here, so blocks overlapping in two
threads are not merged into one process-wide count.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from threadpoolctl import ThreadpoolController

_state = threading.local()  # how deep this thread is inside `one_blas_thread` blocks


@cache
def _blas() -> ThreadpoolController:
    """The process's BLAS thread pools (found once: it scans the loaded libraries)."""
    return ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with BLAS limited to one thread (the outermost block sets the limit
    and restores it; a nested block costs nothing)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        if depth:
            yield
        else:
            with _blas().limit(limits=1, user_api="blas"):
                yield
    finally:
        _state.depth = depth
