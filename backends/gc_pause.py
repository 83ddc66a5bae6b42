"""Python's cyclic garbage collector off while timed work runs: train.py's steps and the profilers that
predict them.

On the H100 hosts automatic collection paused random steps (up to +90 % on ViT-L), and a profiler that
times layers with it on measures launch times the training loop never sees. Both freeze what exists,
switch automatic collection off, and collect explicitly at points of their choosing (train.py every
GC_EVERY steps, the profilers between layers)."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def automatic_gc_off() -> Iterator[None]:
    """Collect once, freeze the survivors (later collections skip them), disable automatic collection; on
    exit unfreeze and restore the collector's previous state. gc.collect() still works inside."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
