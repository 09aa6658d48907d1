"""Where each method's extra time goes: `torch.profiler` on CLIP's step and on each method's, per op.

    python benchmarks/profile_step.py                      # CPU: pdclip-vit-tiny, batch 64, fp32
    python benchmarks/profile_step.py --loss-only 4096     # the loss alone at B = 4096, D = 512
    python benchmarks/profile_step.py --model RN50 --batch-size 256 --precision bf16   # on a GPU

For every variant of `loss_overhead.VARIANTS` it profiles a few steps (a `Trainer.train_step` on
pre-loaded batches, or `method_loss` forward + backward with `--loss-only`) after a warm-up, and
prints the ops whose self time per step exceeds CLIP's the most: the method's own work (teacher
forward, Sinkhorn, softmaxes) and anything avoidable. Self time is the device's on a GPU, the CPU's
otherwise. Profiles are noisy: read the large differences, and time ratios with soft_target_cost.py.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from loss_overhead import VARIANTS, features
from torch.profiler import ProfilerActivity, profile

from pdclip.config import TrainConfig
from pdclip.methods import method_loss
from pdclip.train import Trainer


def self_times(fn: Callable[[], object], steps: int, cuda: bool) -> dict[str, float]:
    """Self time per call of `fn`, in ms, for every op name (after two warm-up calls)."""
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {e.key: getattr(e, attr) / 1e3 / steps for e in prof.key_averages()}


def step_fns(base: TrainConfig, names: list[str], tmp: str) -> dict[str, Callable[[], object]]:
    """One `train_step` per variant, each its own Trainer fed the same pre-loaded batches."""
    trainers = {name: Trainer(replace(base, loss=VARIANTS[name], out=str(Path(tmp, name)))) for name in names}
    batches = list(itertools.islice(trainers[names[0]].batches, 4))
    feeds = {name: itertools.cycle(batches) for name in names}
    return {name: lambda name=name: trainers[name].train_step(next(feeds[name])) for name in names}


def loss_fns(b: int, device: str, names: list[str]) -> dict[str, Callable[[], object]]:
    """`method_loss` forward + backward per variant at batch `b`, D = 512 (as loss_overhead.py)."""
    img, txt = (x.requires_grad_() for x in features(b, 512, device, 0))
    t_img, t_txt = features(b, 512, device, 1)
    scale, scale_soft = torch.tensor(14.3, device=device), torch.tensor(49.4, device=device)

    def step(cfg) -> None:
        method_loss(cfg, img, txt, scale, logit_scale_soft=scale_soft, teacher_image_features=t_img,
                    teacher_text_features=t_txt, teacher_logit_scale=scale, alpha=0.3).loss.backward()

    return {name: lambda cfg=VARIANTS[name]: step(cfg) for name in names}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[v for v in VARIANTS if v != "clip"], choices=list(VARIANTS))
    p.add_argument("--model", default="pdclip-vit-tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--loss-only", type=int, default=0, metavar="B", help="profile the loss alone at batch B")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    p.add_argument("--rows", type=int, default=8, help="ops printed per method")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = ["clip", *[m for m in args.methods if m != "clip"]]
    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    with tempfile.TemporaryDirectory() as tmp:
        if args.loss_only:
            what = f"loss only, B = {args.loss_only}, D = 512"
            fns = loss_fns(args.loss_only, "cuda" if cuda else "cpu", names)
        else:
            what = f"train_step, {args.model}, batch {args.batch_size}, {args.precision}"
            base = TrainConfig(model=args.model, batch_size=args.batch_size, precision=args.precision, steps=10_000,
                               warmup_steps=2, snapshot_every=0, save_every=0, progress=False,
                               data_kwargs={"n_train": args.batch_size * 4})
            fns = step_fns(base, names, tmp)
        times = {name: self_times(fn, args.steps, cuda) for name, fn in fns.items()}
    clip = times["clip"]
    print(f"{what}; {where}; self time per step, ms ({'device' if cuda else 'CPU'})")
    print(f"clip: {sum(clip.values()):.1f} ms in all")
    for name in names[1:]:
        extra = {op: t - clip.get(op, 0.0) for op, t in times[name].items()}
        total = sum(times[name].values())
        print(f"\n{name}: {total:.1f} ms in all, {total - sum(clip.values()):+.1f} ms against clip; largest extras:")
        for op, dt in sorted(extra.items(), key=lambda kv: -kv[1])[: args.rows]:
            print(f"   {dt:+9.2f}  {op}  ({times[name][op]:.2f} vs {clip.get(op, 0.0):.2f})")


if __name__ == "__main__":
    main()
