"""What soft targets cost next to CLIP, every measure of issue 17 in one run (ratios side by side).

    python benchmarks/soft_target_cost.py [--threads 1] [--skip-open-clip] [--skip-frozen]

1. Step time of each method / CLIP's: a `Trainer` per method in this process, stepped in turn on the
   same batches (pdclip-vit-tiny, batch 64, fp32 on a CPU); PSD with its free teachers ("self",
   "intra") and its default one-forward "ema" teacher.
2. The same in the pretrained, feature-cached regime (`frozen_cpu`'s frozen towers on synthetic data,
   cached first; only the heads train, on one thread as `fit` runs them), where the targets' share
   of the step is larger.
3. Loss-only time (targets + loss, forward + backward) at B = 4096, D = 512, each method / CLIP's.
4. pdclip's `sinkhorn` / POT's `ot.sinkhorn`, B = 1024, 5 iterations.
5. Samples/s of `pdclip.train` / `open_clip_train` (CLIP, the same model; subprocesses, alternated):
   each on its own synthetic data (pdclip renders scenes, open_clip transforms one blank image), in
   pdclip's first epoch and in later ones (its pixel cache); then both on the same webdataset shards,
   where the data cost is equal and the ratio is the loops'.

Every timing is a median with the contenders interleaved repeat by repeat, so a shared machine's
drift hits them alike: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from loss_overhead import method_times, sinkhorn_vs_pot
from threadpoolctl import threadpool_limits  # scikit-learn's dependency
from train_throughput import DATA, loop_vs_open_clip, step_times

from pdclip.config import TrainConfig, load_config
from pdclip.features import CachedFeatures
from pdclip.models import model_from_config
from pdclip.runtime import cpu_threads

BENCH = {"steps": 10_000, "warmup_steps": 2, "snapshot_every": 0, "save_every": 0, "progress": False}


def print_ratios(title: str, times: dict[str, float]) -> None:
    print(f"\n{title}")
    print("   " + "  ".join(f"{name + '/clip':>14}" for name in times if name != "clip"))
    print("   " + "  ".join(f"{times[name] / times['clip']:>14.3f}" for name in times if name != "clip")
          + f"   (clip: {1e3 * times['clip']:.1f} ms)")


def frozen_step_times(repeats: int, n_train: int) -> dict[str, float]:
    """Step times with `frozen_cpu`'s cached backbone features (extracted here into a fresh cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config("frozen_cpu").with_overrides({
            "dataset": "synthetic", "data_kwargs": {"n_train": n_train, "n_eval": 16},
            "feature_cache_dir": str(Path(tmp, "cache")), **BENCH})
        CachedFeatures(model_from_config(base), base.dataset, "train", base.data_kwargs, root=base.feature_cache_dir)
        with cpu_threads(None if torch.cuda.is_available() else 1):
            return step_times(base, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op CPU threads, everywhere")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats per measure")
    p.add_argument("--skip-open-clip", action="store_true")
    p.add_argument("--skip-frozen", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads, user_api="blas"):  # POT's numpy: as many threads as torch
        run(args)


def run(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else f'CPU, {args.threads} threads'}")

    base = TrainConfig(batch_size=64, precision="fp32", data_kwargs={"n_train": 512}, **BENCH)
    print_ratios(f"1. step time / CLIP's: {base.model}, batch {base.batch_size}, fp32, Trainer per method, interleaved",
                 step_times(base, args.repeats))
    if not args.skip_frozen:
        print_ratios("2. step time / CLIP's, frozen_cpu towers, cached features (heads only, 1 thread)",
                     frozen_step_times(4 * args.repeats, 256))  # short steps: more repeats
    print_ratios("3. loss-only time / CLIP's, B = 4096, D = 512, forward + backward",
                 method_times(4096, 512, device, max(5, args.repeats // 2)))
    ours, pot, err = sinkhorn_vs_pot(1024, 4 * args.repeats)
    print(f"\n4. sinkhorn B = 1024, 5 iterations: pdclip / POT = {ours / pot:.2f} "
          f"(pdclip {1e3 * ours:.1f} ms, POT {1e3 * pot:.1f} ms), max |plan difference| {err:.1e}")
    if not args.skip_open_clip:
        loop = argparse.Namespace(model=base.model, batch_size=base.batch_size, steps=20, warmup=5, rounds=2,
                                  workers=0, threads=args.threads, precision="fp32")
        print(f"\n5. CLIP samples/s, pdclip.train / open_clip_train ({base.model}, batch {base.batch_size}, fp32)")
        for data, what in DATA.items():
            ours, theirs = loop_vs_open_clip(loop, data)
            print(f"   {ours / theirs:.2f} ({ours:.0f} vs {theirs:.0f}): {what}")

if __name__ == "__main__":
    main()
