"""Data throughput: synthetic generation (images/s per core) and shard decoding (samples/s), side by side.

Run: `python benchmarks/data_throughput.py`. One thread, one process, so the numbers are per core;
a training step of the tutorial's tiny model at batch 128 takes on the order of 0.1-0.5 s on a CPU,
so generation must stay well above `128 / 0.1` = 1,280 images/s to never hold training back.
"""

import os
import tempfile
import time

import torch

from pdclip.data import build_dataset
from pdclip.data.scenes import render
from pdclip.data.shard_writer import write_shards


def rate(fn, n: int) -> float:
    """Calls of `fn(i)` per second over `i < n` (after one warm-up call)."""
    fn(0)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main(n: int = 1000) -> None:
    torch.set_num_threads(1)
    rows = []
    for size in (32, 64):
        ds = build_dataset("synthetic", "train", image_size=size, n_train=n)
        rows.append((f"synthetic {size}px: render only", rate(lambda i, d=ds, s=size: render(d.scenes, i, s), n)))
        rows.append((f"synthetic {size}px: render + train transform", rate(lambda i, d=ds: d[i], n)))
        rows.append((f"synthetic {size}px: a later epoch (kept pixels + train transform)", rate(lambda i, d=ds: d[i], n)))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "jpg"):
            source = build_dataset("synthetic", "test", image_size=64, n_eval=n)
            start = time.perf_counter()
            write_shards(source, f"{tmp}/{fmt}", samples_per_shard=250, image_format=fmt)
            rows.append((f"shards: write 64px {fmt}", n / (time.perf_counter() - start)))
            reader = build_dataset("shards", "val", urls=f"{tmp}/{fmt}/shard-{{00000..00003}}.tar", image_size=64)
            start = time.perf_counter()
            count = sum(1 for _ in reader)
            rows.append((f"shards: read + decode + transform 64px {fmt}", count / (time.perf_counter() - start)))
    width = max(len(name) for name, _ in rows)
    # Shared machines skew per-core numbers: say how busy this one was.
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} during this run")
    print(f"{'measurement (1 thread)':<{width}}  items/s")
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.0f}")


if __name__ == "__main__":
    main()
