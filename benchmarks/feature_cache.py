"""Feature cache: a training step on cached backbone features next to one through the full frozen towers.

    python benchmarks/feature_cache.py                  # CLIP, batch 128, 128 px: frozen_cpu's towers
    python benchmarks/feature_cache.py --method otter   # KD / OTTER also pay the teacher's forward

1. Extraction: the backbones of frozen EfficientNet-Lite0 and MiniLM over `--n` synthetic images and
   their captions into a fresh cache (images/s as `pdclip.features` prints it, and measured here).
2. One `Trainer.train_step` per path on the *same* batch (same pairs, same method, same model
   config), timed side by side in this process: median after a warm-up step. The cached step runs
   only the two heads, the loss and the optimiser (on a CPU with one thread, as `fit` runs it); the
   full step runs both backbones as well. The target is a ratio below 1/20.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pdclip.config import METHODS, load_config
from pdclip.data import collate
from pdclip.features import CachedFeatures
from pdclip.models import model_from_config
from pdclip.runtime import cpu_threads
from pdclip.train import Trainer


def median_step(trainer: Trainer, batch: dict, steps: int) -> float:
    """Median seconds of `train_step(batch)` over `steps` steps, after one warm-up step."""
    trainer.train_step(batch)
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="clip", choices=METHODS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n", type=int, default=256, help="synthetic training pairs to extract")
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up)")
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config("frozen_cpu").with_overrides({
            "dataset": "synthetic", "data_kwargs": {"n_train": args.n, "n_eval": 16}, "method": args.method,
            "batch_size": args.batch_size, "snapshot_every": 0, "save_every": 0, "progress": False,
            "feature_cache_dir": str(Path(tmp, "cache"))})
        print(f"frozen {base.pretrained_image} at {base.image_size} px + {base.pretrained_text}, {base.head} heads, "
              f"{args.method}, batch {args.batch_size}, {device}")
        model = model_from_config(base)
        tic = time.perf_counter()
        CachedFeatures(model, base.dataset, "train", base.data_kwargs, root=base.feature_cache_dir)
        extraction = time.perf_counter() - tic  # images and their captions
        cached = Trainer(base.with_overrides({"out": str(Path(tmp, "cached"))}))  # reads that cache
        full = Trainer(base.with_overrides({"out": str(Path(tmp, "full")), "feature_cache": False,
                                            "data_kwargs": {**base.data_kwargs, "augment": False}}))
        keys = [(0, i) for i in range(args.batch_size)]
        cached_batch = cached.dataset.get_batch(keys)
        full_batch = collate([full.dataset[i] for _, i in keys])
        with cpu_threads(1 if cached.device.type == "cpu" else None):  # as `fit` runs cached training
            t_cached = median_step(cached, cached_batch, args.steps)
        t_full = median_step(full, full_batch, args.steps)
    print(f"\n1. extraction of {args.n} images and their captions: {extraction:.1f} s, "
          f"{args.n / extraction:.1f} images/s (captions included)")
    print(f"\n2. one training step, median of {args.steps}")
    print(f"   cached features   {1000 * t_cached:9.1f} ms")
    print(f"   full towers       {1000 * t_full:9.1f} ms")
    print(f"   ratio cached / full = {t_cached / t_full:.4f} (1/{t_full / t_cached:.0f}; target < 1/20)")


if __name__ == "__main__":
    main()
