"""Batches for training: a deterministic global batch order that survives DDP, workers and resumes.

Global batch `k` is the same pairs in the same order whatever the number of processes, so a run on
2 ranks sees the batch a 1-process run sees, and a resumed run continues where it stopped.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from pdclip.data import collate


class SeededSamples(Dataset):
    """`ds[(epoch, i)]` is `ds[i]` with the torch RNG seeded by `(seed, epoch, i)`: a sample's random
    augmentation depends neither on the rank or worker that loads it nor on a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: `torch.manual_seed` would also queue a CUDA seeding with a stack
            # trace (0.1 ms a sample) and reseed the GPU's generator, which `fork_rng` does not restore.
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.dataset[index]


class GlobalBatchSampler(Sampler):
    """Endless `(epoch, index)` batches for one rank, starting at `start_step`.

    Global batch `k` of epoch `e` is `perm_e[k B : (k + 1) B]` (the last partial batch is dropped);
    rank `r` takes its `r`-th contiguous slice, so the gathered batch is the one-process batch.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start_step: int = 0):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.local = batch_size // world_size
        self.offset = rank * self.local

    def __iter__(self):
        per_epoch, step, perm_epoch = self.n // self.batch_size, self.start_step, None
        while True:
            epoch, k = divmod(step, per_epoch)
            if epoch != perm_epoch:
                perm_epoch = epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            start = k * self.batch_size + self.offset
            yield [(epoch, i) for i in perm[start:start + self.local].tolist()]
            step += 1


def make_batches(dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int, world_size: int,
                 start_step: int):
    """An endless iterator of this rank's collated batches from `start_step` on (`batch_size` is global).

    A dataset with `get_batch(keys)` (`pdclip.features.CachedFeatures`) gets the sampler's `(epoch, index)`
    keys a batch at a time: one array lookup per batch, no DataLoader and no per-sample work.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
    common = {"collate_fn": collate, "num_workers": num_workers, "pin_memory": torch.cuda.is_available()}
    if isinstance(dataset, IterableDataset):  # shards: the reader splits by rank; order is not resumable
        loader = DataLoader(dataset, batch_size=batch_size // world_size, drop_last=True, **common)
    else:
        sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step)
        if hasattr(dataset, "get_batch"):
            yield from map(dataset.get_batch, sampler)  # the sampler never ends
            return
        loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, **common)
    while True:
        yield from loader


def probe_batch(dataset: Dataset, size: int, seed: int, rank: int, world_size: int) -> dict:
    """This rank's slice of a fixed batch of `size` pairs, the same at every snapshot."""
    if size % world_size:
        raise ValueError(f"snapshot_size={size} must be divisible by the {world_size} processes")
    local = size // world_size
    if isinstance(dataset, IterableDataset):
        return collate(list(itertools.islice(iter(dataset), local)))
    if size > len(dataset):
        raise ValueError(f"snapshot_size={size} exceeds the dataset's {len(dataset)} samples")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    keys = [(-1, i) for i in chosen[rank * local:(rank + 1) * local].tolist()]
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(keys)
    samples = SeededSamples(dataset, seed)
    return collate([samples[key] for key in keys])
