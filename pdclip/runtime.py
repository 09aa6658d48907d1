"""Runtime helpers that belong to no one concept: where caches live, the CPU threads a block runs on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir(name: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """Where pdclip keeps its cache `name` (decoded clip art, backbone features).

    `$PDCLIP_CACHE/name` when set; else, when pdclip runs from a source checkout (an editable install,
    Binder, Colab's clone: `pyproject.toml` beside the package), the checkout's `.cache/name`, which
    `make clipart` fills; else, for a plain `pip install`, the user's cache folder
    (`$XDG_CACHE_HOME`, default `~/.cache`) `/pdclip/name`, never the site-packages tree.
    """
    if os.environ.get("PDCLIP_CACHE"):
        return Path(os.environ["PDCLIP_CACHE"]) / name
    checkout = package_dir.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".cache" / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdclip" / name


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
