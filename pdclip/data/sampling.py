"""Batches for training: a deterministic global batch order that survives DDP, workers and resumes.

Global batch `k` is the same pairs in the same order whatever the number of processes, so a run on
2 ranks sees the batch a 1-process run sees, and a resumed run continues where it stopped.

Every random choice of the data order (permutations, shard orders, shuffle buffers, augmentations)
draws from `mixed_seed(seed, epoch, purpose, ...)`: numpy's `SeedSequence` hashes the whole tuple, so
seed 1 at epoch 0 shares nothing with seed 0 at epoch 1 (`seed + epoch` made them equal).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from pdclip.data.base import BatchedDataset, collate
from pdclip.distributed import world

# What a seed is for: the same (seed, epoch) gives unrelated streams for each purpose.
PERMUTATION, AUGMENTATION, SHARD_ORDER, SHUFFLE_BUFFER = range(4)


def mixed_seed(seed: int, epoch: int, purpose: int, *more: int) -> int:
    """A 63-bit seed that depends on the whole tuple `(seed, epoch, purpose, *more)`.

    Negative entries (the probe batch's epoch -1) are folded onto the naturals first (zig-zag), as
    `SeedSequence` takes non-negative integers only.
    """
    words = [2 * x if x >= 0 else -2 * x - 1 for x in (seed, epoch, purpose, *more)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, epoch: int, purpose: int, *more: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded by `mixed_seed(seed, epoch, purpose, *more)`."""
    return torch.Generator().manual_seed(mixed_seed(seed, epoch, purpose, *more))


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run the block with the global CPU torch RNG seeded by `seed`, then put the RNG back."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: `torch.manual_seed` would also queue a CUDA seeding with a stack
        # trace (0.1 ms a sample) and reseed the GPU's generator, which `fork_rng` does not restore.
        torch.default_generator.manual_seed(seed)
        yield


class SeededSamples(Dataset):
    """`ds[(epoch, i)]` is `ds[i]` with the torch RNG seeded by `(seed, epoch, i)`: a sample's random
    augmentation depends neither on the rank or worker that loads it nor on a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        with seeded_torch(mixed_seed(self.seed, epoch, AUGMENTATION, index)):
            return self.dataset[index]


class GlobalBatchSampler(Sampler):
    """Endless `(epoch, index)` batches for one rank, starting at `start_step`.

    Global batch `k` of epoch `e` is `perm_e[k B : (k + 1) B]` (the last partial batch is dropped),
    `perm_e` drawn from `seeded_generator(seed, e, PERMUTATION)`; rank `r` takes its `r`-th
    contiguous slice, so the gathered batch is the one-process batch.
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
                perm = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch, PERMUTATION))
            start = k * self.batch_size + self.offset
            yield [(epoch, i) for i in perm[start:start + self.local].tolist()]
            step += 1


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank (one tiny all-reduce under torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    have = torch.tensor([int(flag)], device=device)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    return bool(have.item())


class ShardBatches:
    """Endless collated batches of this rank's share of a shard stream, epoch after epoch.

    Each epoch calls `dataset.set_epoch(e)` and starts a fresh DataLoader iterator, so every worker
    reads epoch `e`'s shard order and shuffle buffer. The epoch ends on every rank as soon as one
    rank runs out of full batches (a flag all-reduced per batch), so the ranks never drift apart.
    The stream of an epoch is deterministic, so a resume at `(epoch, batch)` re-creates it and skips
    the `batch` batches already trained on: they are decoded again (seconds per thousand batches),
    which keeps the reader simple and the continuation exact.

    Raises:
        ValueError: (one line, before the first step) a reader would get no shard, or an epoch gives
            some rank no full batch.
    """

    def __init__(self, dataset: IterableDataset, local_batch: int, num_workers: int, epoch: int = 0, batch: int = 0):
        dataset.check_readers(num_workers)
        self.dataset, self.local_batch, self.num_workers = dataset, local_batch, num_workers
        self.epoch, self.batch, self.iterator = epoch, batch, None
        self.loader = DataLoader(dataset, batch_size=local_batch, drop_last=True, collate_fn=collate,
                                 num_workers=num_workers, pin_memory=torch.cuda.is_available())

    def state(self) -> dict:
        """Where the stream stands: `batch` batches of `epoch` consumed (what a checkpoint stores)."""
        return {"epoch": self.epoch, "batch": self.batch, "num_workers": self.num_workers,
                "world_size": world()[1]}

    def __iter__(self) -> ShardBatches:
        return self

    def __next__(self) -> dict:
        while True:
            if self.iterator is None:
                self.dataset.set_epoch(self.epoch)
                self.iterator = iter(self.loader)
                for _ in range(self.batch):  # a resume: these batches were trained on, by every rank
                    next(self.iterator)
            batch = next(self.iterator, None)
            if all_ranks(batch is not None):
                self.batch += 1
                return batch
            if self.batch == 0:
                rank, world_size = world()
                raise ValueError(f"shards: epoch {self.epoch} gives rank {rank} of {world_size} no full batch of "
                                 f"{self.local_batch} pairs ({max(self.num_workers, 1)} reader(s) per rank fill "
                                 "their own batches): lower batch_size or num_workers, or add data")
            self.iterator, self.epoch, self.batch = None, self.epoch + 1, 0


def make_batches(dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int, world_size: int,
                 start_step: int, shard_state: dict | None = None):
    """An endless iterator of this rank's collated batches from `start_step` on (`batch_size` is global).

    A `BatchedDataset` (`pdclip.features.CachedFeatures`) gets the sampler's `(epoch, index)`
    keys a batch at a time: one array lookup per batch, no DataLoader and no per-sample work. A shard
    stream (iterable) gives a `ShardBatches` starting at `shard_state` (a checkpoint's `state()`).
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
    if isinstance(dataset, IterableDataset):
        state = shard_state or {"epoch": 0, "batch": 0, "num_workers": num_workers, "world_size": world_size}
        if (state["num_workers"], state["world_size"]) != (num_workers, world_size):
            raise ValueError(f"cannot resume a shard stream read by {state['world_size']} rank(s) x "
                             f"{state['num_workers']} workers with {world_size} x {num_workers}: keep both as they were")
        return ShardBatches(dataset, batch_size // world_size, num_workers, state["epoch"], state["batch"])
    return _map_style_batches(dataset, batch_size, seed, num_workers, rank, world_size, start_step)


def _map_style_batches(dataset: Dataset, batch_size: int, seed: int, num_workers: int, rank: int,
                       world_size: int, start_step: int) -> Iterator[dict]:
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_step)
    if isinstance(dataset, BatchedDataset):
        yield from map(dataset.get_batch, sampler)  # the sampler never ends
        return
    loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, collate_fn=collate,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available())
    yield from loader  # the sampler never ends


def probe_batch(dataset: Dataset, size: int, seed: int, rank: int, world_size: int) -> dict:
    """This rank's slice of a fixed batch of `size` pairs, the same at every snapshot (and resume)."""
    if size % world_size:
        raise ValueError(f"snapshot_size={size} must be divisible by the {world_size} processes")
    local = size // world_size
    if isinstance(dataset, IterableDataset):  # this rank's first pairs of epoch 0, in the main process
        return collate(list(itertools.islice(dataset.stream(epoch=0), local)))
    if size > len(dataset):
        raise ValueError(f"snapshot_size={size} exceeds the dataset's {len(dataset)} samples")
    chosen = torch.randperm(len(dataset), generator=seeded_generator(seed, -1, PERMUTATION))[:size]
    keys = [(-1, i) for i in chosen[rank * local:(rank + 1) * local].tolist()]
    if isinstance(dataset, BatchedDataset):
        return dataset.get_batch(keys)
    samples = SeededSamples(dataset, seed)
    return collate([samples[key] for key in keys])
