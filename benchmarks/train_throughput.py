"""Training throughput: pdclip's loop next to open_clip's own, and each method's cost relative to CLIP.

    python benchmarks/train_throughput.py                       # CPU: pdclip-vit-tiny, 64 px, fp32
    python benchmarks/train_throughput.py --model RN50 --batch-size 256 --workers 8   # GPU: 224 px, AMP

1. The same model config, batch size, precision and worker count trained by `python -m pdclip.train
   --method clip` and by `python -m open_clip_train.main --dataset-type synthetic` (one subprocess
   each). Both report per-step samples/s including data loading; we print the medians after a
   warm-up. The data differ in cost: pdclip renders its synthetic scenes, open_clip transforms one
   blank image, so the ratio is a lower bound on the loop itself.
2. Every method with pdclip's loop: median step time and its ratio to CLIP's (PSD should cost
   about nothing extra; KD and OTTER pay one teacher forward and the EMA update).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pdclip.config import METHODS
from pdclip.models import CONFIG_DIR

OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
RUN_OPEN_CLIP = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                 "from open_clip_train.main import main; main(sys.argv[2:])")


def median_after_warmup(values: list[float], warmup: int) -> float:
    if len(values) <= warmup:
        raise RuntimeError(f"only {len(values)} steps measured, need more than the {warmup} warm-up steps")
    return statistics.median(values[warmup:])


def pdclip_rates(args, method: str, out: Path) -> list[float]:
    """Per-step samples/s of `python -m pdclip.train`."""
    cmd = [sys.executable, "-m", "pdclip.train", f"--method={method}", f"--model={args.model}",
           f"--steps={args.steps}", f"--batch_size={args.batch_size}", f"--precision={args.precision}",
           f"--num_workers={args.workers}", f"--data_kwargs={json.dumps({'n_train': args.batch_size * 8})}",
           "--snapshot_every=0", "--save_every=0", "--progress=false", "--warmup_steps=2",
           f"--out={out / method}", "--overwrite"]
    subprocess.run(cmd, check=True, capture_output=True)
    lines = (out / method / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["samples_per_s"] for line in lines]


def open_clip_rates(args, out: Path) -> list[float]:
    """Per-step samples/s parsed from open_clip_train's log (`log-every-n-steps 1`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = ["--dataset-type", "synthetic", "--model", args.model, "--batch-size", str(args.batch_size),
            "--train-num-samples", str(args.batch_size * args.steps), "--epochs", "1", "--lr", "1e-3",
            "--wd", "0.1", "--warmup", "2", "--workers", str(args.workers), "--device", device,
            "--precision", OPEN_CLIP_PRECISION[args.precision], "--log-every-n-steps", "1",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--logs", str(out), "--name", "open_clip"]
    proc = subprocess.run([sys.executable, "-c", RUN_OPEN_CLIP, str(CONFIG_DIR), *argv],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"open_clip_train failed:\n{proc.stderr[-2000:]}")
    return [float(x) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", proc.stdout + proc.stderr)]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RN50" if cuda else "pdclip-vit-tiny")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 64)
    p.add_argument("--steps", type=int, default=40 if cuda else 20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    p.add_argument("--workers", type=int, default=8 if cuda else 0)
    p.add_argument("--precision", default="bf16" if cuda and torch.cuda.is_bf16_supported() else "fp16" if cuda else "fp32",
                   choices=sorted(OPEN_CLIP_PRECISION))
    args = p.parse_args()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model}, batch {args.batch_size}, {args.precision}, {args.workers} workers, {device}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rates = {m: median_after_warmup(pdclip_rates(args, m, out), args.warmup) for m in METHODS}
        theirs = median_after_warmup(open_clip_rates(args, out), args.warmup)
    print("\n1. CLIP training, samples/s (median per step, data loading included)")
    print(f"   pdclip.train        {rates['clip']:10.1f}")
    print(f"   open_clip_train     {theirs:10.1f}")
    print(f"   ratio pdclip / open_clip = {rates['clip'] / theirs:.2f}")
    print("\n2. Step time per method, pdclip.train")
    for method, rate in rates.items():
        step_ms = 1000 * args.batch_size / rate
        print(f"   {method:6s} {step_ms:8.1f} ms/step   x{rates['clip'] / rate:.2f} of CLIP")


if __name__ == "__main__":
    main()
