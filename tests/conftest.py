import os

import pytest
import torch

# Tests must never reach a model hub; the code under test loads everything from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread, here and (through the environment) in every process a test starts: on a busy
# 2-core CPU two threads wait on each other (see `pdclip.runtime.cpu_threads`), and a test's speed
# should not depend on what else the machine runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def features():
    """Seeded normalised `(B, D)` image/text features with some shared structure."""

    def make(b: int, d: int = 32, seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        img = torch.randn(b, d, generator=g)
        txt = img + 0.8 * torch.randn(b, d, generator=g)
        norm = torch.nn.functional.normalize
        return norm(img, dim=-1).to(dtype), norm(txt, dim=-1).to(dtype)

    return make


def pytest_terminal_summary(terminalreporter):
    """Print every notebook's smoke-run memory peak and its margin to the limit (issue: headroom)."""
    import sys

    SMOKE_PEAKS = getattr(sys.modules.get("test_notebooks"), "SMOKE_PEAKS", None)
    if SMOKE_PEAKS:
        from tools.tutorial import MEMORY_LIMIT_MB, margin

        worst = max(SMOKE_PEAKS, key=SMOKE_PEAKS.get)
        rows = ", ".join(f"{name[:2]} {peak:.0f}" for name, peak in SMOKE_PEAKS.items())
        terminalreporter.write_line(f"notebook memory, smoke runs (MB, limit {MEMORY_LIMIT_MB}): {rows}; "
                                    f"largest {SMOKE_PEAKS[worst]:.0f} MB ({worst}), margin {margin(SMOKE_PEAKS[worst]):.0%}")
