"""Python's cyclic garbage collector held off for the length of one pass.

A pass over a 10,000-element intent allocates some 10^5 container objects (the
parsed document, the compiled objects, the plan's actions, the decoded kernel
replies). Each 700 allocations start a generation-0 collection and every tenth
of those a generation-1 one, which rescan the pass's young objects again and
again: 10-35 ms of a one-element pass at that size on a 2-CPU VM, measured with
gc.callbacks. Nothing in a pass needs a reference cycle freed before it ends
(reference counting frees everything else as it goes), so the collector waits
until the pass is over and then runs as usual, between passes.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside the block; nested blocks and a collector disabled by the caller
    are left as they are."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
