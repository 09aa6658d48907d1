"""Runtime helpers that belong to no one concept: the CPU threads a block runs on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads (`None`: as they are), then restore the count.

    Training on cached features leaves only the heads' small matmuls: one thread runs them in about
    10 ms a step at batch 128, while two threads on a busy shared 2-core CPU wait on each other for
    about 200 ms (measured with `frozen_cpu`, 2026-11-28).
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
