import os

import pytest
import torch

# Tests must never reach a model hub; the code under test loads everything from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


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
