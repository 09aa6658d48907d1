"""Each method's targets + loss time relative to CLIP's, and pdclip's sinkhorn vs POT's, in one run.

    python benchmarks/loss_overhead.py [--sizes 256 1024 4096] [--device cpu|cuda]

Times are medians over repeats, measured side by side in this one process; compare the ratios, not the
absolute numbers (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import ot
import torch

from pdclip.config import METHODS, LossConfig
from pdclip.methods import method_loss
from pdclip.targets import sinkhorn


def median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def features(b: int, d: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return tuple(norm(torch.randn(b, d, generator=g), dim=-1).to(device) for _ in range(2))


def method_times(b: int, d: int, device: str, repeats: int) -> dict[str, float]:
    img, txt = (x.requires_grad_() for x in features(b, d, device, 0))
    t_img, t_txt = features(b, d, device, 1)
    scale, scale_soft = torch.tensor(14.3, device=device), torch.tensor(49.4, device=device)

    def step(method: str):
        out = method_loss(LossConfig(method=method), img, txt, scale, logit_scale_soft=scale_soft,
                          teacher_image_features=t_img, teacher_text_features=t_txt, alpha=0.3)
        out.loss.backward()

    return {m: median_seconds(lambda m=m: step(m), repeats, device) for m in METHODS}


def sinkhorn_vs_pot(b: int, repeats: int) -> tuple[float, float, float]:
    img, txt = features(b, 512, "cpu", 2)
    cost = -(img @ img.T + txt @ txt.T + img @ txt.T - 200 * torch.eye(b))
    eps = 0.5  # POT's linear-domain solver underflows at OTTER's 0.15 on this cost; 0.5 keeps both finite
    marg = np.full(b, 1 / b)
    c64 = cost.double().numpy()

    def pot():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return ot.sinkhorn(marg, marg, c64, eps, numItermax=5, stopThr=0.0)

    ours_t = median_seconds(lambda: sinkhorn(cost, eps, 5), repeats, "cpu")
    pot_t = median_seconds(pot, repeats, "cpu")
    err = float(np.abs(sinkhorn(cost, eps, 5).double().numpy() - pot()).max())
    return ours_t, pot_t, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} D={args.dim} (forward+backward, median of {args.repeats})")
    print(f"{'B':>6} {'clip ms':>9} " + " ".join(f"{m + '/clip':>11}" for m in METHODS))
    for b in args.sizes:
        t = method_times(b, args.dim, args.device, args.repeats)
        print(f"{b:>6} {1e3 * t['clip']:>9.2f} " + " ".join(f"{t[m] / t['clip']:>11.2f}" for m in METHODS))
    ours, pot, err = sinkhorn_vs_pot(1024, args.repeats)
    print(f"sinkhorn B=1024, 5 iters: pdclip {1e3 * ours:.1f} ms, POT {1e3 * pot:.1f} ms, "
          f"POT/pdclip = {pot / ours:.2f}x, max |plan difference| = {err:.2e}")


if __name__ == "__main__":
    main()
