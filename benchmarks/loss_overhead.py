"""Each method's targets + loss time relative to CLIP's, and pdclip's sinkhorn vs POT's, in one run.

    python benchmarks/loss_overhead.py [--sizes 256 1024 4096] [--device cpu|cuda]

Times are medians over repeats, the contenders interleaved repeat by repeat (A, B, C, A, B, C, ...) in
this one process so that the machine's drift hits them alike; compare the ratios, not the absolute
numbers (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import ot
import torch

from pdclip.config import LossConfig
from pdclip.methods import method_loss
from pdclip.targets import sinkhorn

# What is timed: every method, PSD with each kind of teacher ("psd" is the free "self" teacher), and the
# plain losses' speed paths.
VARIANTS = {
    "clip": LossConfig(method="clip"),
    "ls": LossConfig(method="ls"),
    "kd": LossConfig(method="kd"),
    "psd": LossConfig(method="psd", psd_teacher="self"),
    "psd-intra": LossConfig(method="psd", psd_teacher="intra"),
    "psd-ema": LossConfig(method="psd", psd_teacher="ema"),
    "otter": LossConfig(method="otter"),
    # The speed paths (`fast_loss`, pdclip.fast), each beside its plain default above.
    "clip-fast": LossConfig(method="clip", fast_loss=True),
    "psd-fast": LossConfig(method="psd", psd_teacher="self", fast_loss=True),
    "otter-fast": LossConfig(method="otter", fast_loss=True),
}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds, one call of each per round, after a warm-up round."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def features(b: int, d: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return tuple(norm(torch.randn(b, d, generator=g), dim=-1).to(device) for _ in range(2))


def method_times(b: int, d: int, device: str, repeats: int) -> dict[str, float]:
    """Median forward + backward seconds of each variant's `method_loss` at batch `b`, dimension `d`."""
    img, txt = (x.requires_grad_() for x in features(b, d, device, 0))
    t_img, t_txt = features(b, d, device, 1)
    scale, scale_soft = torch.tensor(14.3, device=device), torch.tensor(49.4, device=device)

    def step(cfg: LossConfig) -> None:
        out = method_loss(cfg, img, txt, scale, logit_scale_soft=scale_soft, teacher_image_features=t_img,
                          teacher_text_features=t_txt, teacher_logit_scale=scale, alpha=0.3)
        out.loss.backward()

    return interleaved_medians({name: lambda cfg=cfg: step(cfg) for name, cfg in VARIANTS.items()}, repeats, device)


def sinkhorn_vs_pot(b: int, repeats: int) -> tuple[float, float, float]:
    """pdclip's and POT's median seconds for 5 iterations on an OTTER-like `(b, b)` cost, and their largest difference."""
    img, txt = features(b, 512, "cpu", 2)
    cost = -(img @ img.T + txt @ txt.T + img @ txt.T - 200 * torch.eye(b))
    eps = 0.5  # POT's linear-domain solver underflows at OTTER's 0.15 on this cost; 0.5 keeps both finite
    marg = np.full(b, 1 / b)
    c64 = cost.double().numpy()

    def pot():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return ot.sinkhorn(marg, marg, c64, eps, numItermax=5, stopThr=0.0)

    t = interleaved_medians({"pdclip": lambda: sinkhorn(cost, eps, 5), "pot": pot}, repeats)
    err = float(np.abs(sinkhorn(cost, eps, 5).double().numpy() - pot()).max())
    return t["pdclip"], t["pot"], err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} D={args.dim} (forward+backward, median of {args.repeats})")
    print(f"{'B':>6} {'clip ms':>9} " + " ".join(f"{m + '/clip':>15}" for m in VARIANTS))
    for b in args.sizes:
        t = method_times(b, args.dim, args.device, args.repeats)
        print(f"{b:>6} {1e3 * t['clip']:>9.2f} " + " ".join(f"{t[m] / t['clip']:>15.2f}" for m in VARIANTS))
    ours, pot, err = sinkhorn_vs_pot(1024, 4 * args.repeats)
    print(f"sinkhorn B=1024, 5 iters: pdclip {1e3 * ours:.1f} ms, POT {1e3 * pot:.1f} ms, "
          f"pdclip/POT = {ours / pot:.2f}, max |plan difference| = {err:.2e}")


if __name__ == "__main__":
    main()
