"""One training loop for every method: `fit(cfg)` and the CLI.

    python -m pdclip.train --method psd --dataset synthetic --steps 300 --out runs/psd
    python -m pdclip.train --config tutorial_cpu --method otter --out runs/otter
    torchrun --nproc_per_node=2 -m pdclip.train --method otter --out runs/ddp   # DDP, soft targets on the global batch

A method is only a name here: `pdclip.methods.method_loss` maps it to targets and a loss. The loop adds
what every method shares: warm-up + cosine lr, AMP on a GPU, gradient clipping, the teacher network
(`pdclip.teacher`: EMA for KD / OTTER, EMA or snapshot for PSD), per-step metrics
(`<out>/metrics.jsonl`), snapshots of a fixed probe batch's logits and
targets (`<out>/snapshots/step_XXXXXX.pt`, for the visualisation notebook), an evaluation hook
(`<out>/eval.jsonl`), a log (`<out>/train.log`; `--report-to tensorboard` too) and checkpoints that
resume exactly (`<out>/checkpoint_XXXXXX.pt`, `--resume latest|PATH`; see `pdclip.checkpoint`).
`python -m pdclip.train --help` lists every option.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pdclip.checkpoint import RunFiles, load_checkpoint, read_checkpoint, rng_state, set_rng_state
from pdclip.cli import cli_help, parse_cli
from pdclip.config import TrainConfig
from pdclip.data import build_dataset, split_kwargs
from pdclip.data.sampling import make_batches, probe_batch
from pdclip.distributed import _gather, init_distributed, world
from pdclip.features.dataset import CachedFeatures
from pdclip.features.heads import HeadsOnly
from pdclip.methods import MethodOutput, method_loss
from pdclip.models import load_trainable_state, model_from_config, trainable_state
from pdclip.positives import caption_keys, image_keys
from pdclip.run_setup import EvalFn, autocast_dtype, default_eval_fn, make_optimizer, pick_device
from pdclip.runtime import cpu_threads
from pdclip.schedules import lr_at, psd_alpha
from pdclip.teacher import make_teacher

log = logging.getLogger("pdclip.train")  # not __name__: under `python -m` that is "__main__", outside pdclip's loggers
SCALES = ("logit_scale", "logit_scale_soft")  # the student's multipliers in its forward's outputs
__all__ = ["fit", "load_checkpoint", "Trainer", "NonFiniteLossError", "main"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; training stopped before the update, the last checkpoint is intact."""


class Trainer:
    """The state of one run: model (+ DDP wrapper), optimiser, scaler, teacher, RNG, step."""

    def __init__(self, cfg: TrainConfig, eval_fn: EvalFn | None = None):
        self.cfg, self.eval_fn = cfg, eval_fn
        self.rank, self.world_size = world()
        self.device = pick_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)  # checked before the slow model / data
        if self.device.type == "cuda":  # TF32 for the fp32 matmuls and convolutions left outside autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.files = RunFiles(Path(cfg.out), cfg, is_main=self.rank == 0)
        torch.manual_seed(cfg.seed)
        self.model = model_from_config(cfg).to(self.device)
        self.dataset = self.train_data()
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.teacher = make_teacher(self.model, cfg.loss)  # EMA / snapshot copy, or None
        self.generator = torch.Generator().manual_seed(cfg.seed)  # PSD's subsets: the same on every rank
        self.step, self.saved_step, self.shard_state = 0, None, None
        if self.files.resume_from is not None:  # --resume latest | PATH, resolved by RunFiles
            self.restore(read_checkpoint(self.files.resume_from))
        self.files.start(self.step)
        # With the feature cache, student and teacher take backbone features: only their heads run.
        self.student = HeadsOnly(self.model) if cfg.feature_cache else self.model
        self.teacher_net = (None if self.teacher is None else
                            HeadsOnly(self.teacher.module) if cfg.feature_cache else self.teacher.module)
        self.net = self.student
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.student, device_ids=ids)
        self.batches = make_batches(self.dataset, cfg.batch_size, cfg.seed, cfg.num_workers,
                                    self.rank, self.world_size, self.step, self.shard_state)
        self.probe = (probe_batch(self.dataset, cfg.snapshot_size, cfg.seed, self.rank, self.world_size)
                      if cfg.snapshot_every else None)

    def forward_loss(self, net: torch.nn.Module, batch: dict, alpha: float, generator: torch.Generator) -> tuple[MethodOutput, dict]:
        """Teacher (if any) and student forward, then the method's loss on the global batch."""
        images, tokens = self.inputs(batch)
        teacher = self.teacher_outputs([(images, tokens)])
        with self.autocast():
            out = net(images, tokens)
        return self.method_output(out, teacher, batch, images, alpha, generator), out

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def teacher_outputs(self, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The teacher network's features of the rank's batch, `(B_local, D)` each, computed chunk by chunk
        (the micro-batches of `accumulate_gradients`), and its multiplier; `{}` for methods without one."""
        if self.teacher_net is None:
            return {}
        with self.autocast():
            image = torch.cat([self.teacher_net.encode_image(images) for images, _ in chunks])
            text = torch.cat([self.teacher_net.encode_text(tokens) for _, tokens in chunks])
            scale = self.teacher_net.scales()[0]
        return {"teacher_image_features": image.float(), "teacher_text_features": text.float(),
                "teacher_logit_scale": scale.float()}

    def method_output(self, out: dict, teacher: dict, batch: dict, images: torch.Tensor, alpha: float,
                      generator: torch.Generator, check_finite: bool = True) -> MethodOutput:
        """`method_loss` on the student's outputs `out` (features `(B_local, D)`, scales) for `batch`;
        `check_finite=False` leaves its value checks (host syncs) to `train_step`'s one read of the loss."""
        # Targets (softmax, Sinkhorn) run in float32 whatever the autocast dtype.
        return method_loss(self.cfg.loss, out["image_features"].float(), out["text_features"].float(),
                           out["logit_scale"].float(), logit_scale_soft=out["logit_scale_soft"].float(),
                           alpha=alpha, generator=generator, check_finite=check_finite, **teacher,
                           **self.positive_keys(batch, images))

    def accumulate_gradients(self, batch: dict, alpha: float) -> tuple[MethodOutput, dict]:
        """Forward and backward of the whole rank's batch in `cfg.accum_freq` micro-batches, leaving in
        `.grad` the gradient of the method's loss on the whole (global) batch; returns its loss and outputs.

        With `accum_freq = k > 1` this is open_clip's feature caching: a no-grad forward of every
        micro-batch caches its features `(B_local / k, D)` (and the teacher's); then for each micro-batch
        `j` a forward with grad, whose features replace slot `j` of the cache, the loss over the whole
        batch, and a backward. Only slot `j` carries grad, so the `k` backwards add up to the one
        backward of the big batch: the same targets (the same PSD subset: the generator is rewound
        each time), the same loss, the same gradient. The temperatures, which every micro-step uses
        with grad, keep it in the last micro-step only (open_clip counts their gradient `k` times).
        This needs towers whose forward does not depend on the micro-batch: BatchNorm normalises
        with the micro-batch's statistics, and dropout draws other masks in the two forwards.
        """
        k = self.cfg.accum_freq
        images, tokens = self.inputs(batch)
        if len(images) < k:
            raise ValueError(f"accum_freq={k} needs at least {k} pairs per rank, got {len(images)}")
        chunks = list(zip(images.tensor_split(k), tokens.tensor_split(k), strict=True))
        teacher = self.teacher_outputs(chunks)
        keys = ("image_features", "text_features")
        cached = None
        if k > 1:
            with torch.no_grad(), self.autocast():
                cached = [self.student(*chunk) for chunk in chunks]
        start = self.generator.get_state()
        for j, chunk in enumerate(chunks):
            last = j == k - 1
            self.generator.set_state(start)  # PSD's subset: the same in every micro-step
            # Under DDP, gradients are averaged over the ranks once, in the last micro-step's backward.
            sync = nullcontext() if last or not isinstance(self.net, DistributedDataParallel) else self.net.no_sync()
            with sync:
                with self.autocast():
                    fresh = self.net(*chunk)
                out = {**fresh, **({} if last else {name: fresh[name].detach() for name in SCALES})}
                if cached is not None:
                    out.update({key: torch.cat([c[key] for c in cached[:j]] + [fresh[key]] +
                                               [c[key] for c in cached[j + 1:]]) for key in keys})
                result = self.method_output(out, teacher, batch, images, alpha, self.generator, check_finite=False)
                self.scaler.scale(result.loss).backward()
        return result, out

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            kept = f"{self.files.checkpoint} (step {self.saved_step})" if self.saved_step else "no checkpoint yet"
            raise NonFiniteLossError(f"loss is {loss} at step {self.step + 1}; stopped before the update. "
                                     f"Last good checkpoint: {kept}. Try a lower --lr, --precision=fp32 or check the data.")

    def positive_keys(self, batch: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The multi-positive keys of this rank's batch (`pdclip.positives`), when the method uses them:
        equal captions, and equal image inputs (pixels, or cached backbone features)."""
        loss = self.cfg.loss
        keys = {"caption_keys": caption_keys(batch["text"])} if loss.multi_positive else {}
        if loss.positive_images:
            keys["image_keys"] = image_keys(images)
        return keys

    def train_data(self):
        """The training split, or with `cfg.feature_cache` its backbone features (extracted on first use;
        under DDP rank 0 extracts while the other ranks wait, then they read its files)."""
        cfg = self.cfg
        kwargs = split_kwargs(cfg.dataset, "train", cfg.data_kwargs, cfg.train_data)
        if not cfg.feature_cache:
            return build_dataset(cfg.dataset, "train", **{"image_size": self.model.image_size, **kwargs})
        if self.rank > 0:
            dist.barrier()
        features = CachedFeatures(self.model, cfg.dataset, "train", kwargs, views=cfg.feature_views,
                                  root=cfg.feature_cache_dir)
        if self.rank == 0 and self.world_size > 1:
            dist.barrier()
        return features

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What the towers take, on the device: images `(B, 3, H, W)` and token ids `(B, L)`, or with
        the feature cache the backbones' outputs `(B, F)` and `(B, F_t)`."""
        images, tokens = self.student.inputs(batch)
        return images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimiser update at `self.step`; returns the metrics record."""
        cfg, step = self.cfg, self.step
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # pretrained weights: make_optimizer's lr_scale
        alpha = self.alpha(step)
        if self.teacher is not None:
            self.teacher.update(self.model)  # before the student's forward (OTTER's order)
        self.optimizer.zero_grad(set_to_none=True)
        result, out = self.accumulate_gradients(batch, alpha)
        # The step's one host sync: every logged scalar read in one copy, the loss's finiteness checked
        # on it before the update (each `.item()` would stall an accelerator's queue once more).
        scalars = {**{k: v for k, v in result.parts.items() if isinstance(v, torch.Tensor)},
                   "loss": result.loss.detach(), **{name: out[name].detach() for name in SCALES}}
        values = dict(zip(scalars, torch.stack([v.float() for v in scalars.values()]).tolist(), strict=True))
        self.check_finite(values["loss"])
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.clamp_scales_()
        self.step += 1
        return {"step": self.step, **result.parts, **values, "alpha": alpha, "lr": lr}

    def alpha(self, step: int) -> float:
        loss = self.cfg.loss
        return psd_alpha(step, self.cfg.steps, loss.psd_alpha_max, loss.psd_schedule) if loss.method == "psd" else 0.0

    @torch.no_grad()
    def snapshot(self) -> None:
        """Save the probe batch's logits and targets (every rank computes, rank 0 writes)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)  # the same PSD subset in every snapshot
        result, out = self.forward_loss(self.student, self.probe, self.alpha(self.step), generator)
        self.model.train()
        self.files.save_snapshot(self.step, {
            "step": self.step, "method": self.cfg.loss.method, "alpha": self.alpha(self.step),
            "logits": result.logits.cpu(), "targets_i2t": result.targets_i2t.cpu(),
            "targets_t2i": result.targets_t2i.cpu(), "logit_scale": out["logit_scale"].item(),
            "index": _gather(self.probe["index"].to(self.device)),
        })

    def evaluate(self) -> dict[str, float]:
        results = self.eval_fn(self.model, self.step) if self.rank == 0 else {}
        self.files.log_eval(self.step, results)
        return results

    def state_dict(self) -> dict:
        model, frozen = trainable_state(self.model)  # frozen backbones: their hash, not their ~110 MB
        return {"step": self.step, "config": self.cfg.to_dict(), "model": model, "frozen": frozen,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher else {}, "rng": rng_state(self.generator),
                # A shard stream's position (epoch, batches consumed); map-style orders follow from `step`.
                **({"data": self.batches.state()} if hasattr(self.batches, "state") else {})}

    def restore(self, ckpt: dict) -> None:
        self.files.check_resumable(ckpt["config"])
        load_trainable_state(self.model, ckpt["model"], ckpt.get("frozen", {}))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.teacher is not None:
            self.teacher.load_state_dict(ckpt["teacher"])
        set_rng_state(ckpt["rng"], self.generator)
        self.step = self.saved_step = ckpt["step"]
        self.shard_state = ckpt.get("data")

    def save(self) -> None:
        if self.rank == 0:
            self.files.save_checkpoint(self.state_dict())
        self.saved_step = self.step

    def due(self, every: int) -> bool:
        """Whether a periodic action (every `every` steps, 0 = never; also at the end) runs now."""
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.steps)

    def run(self) -> dict:
        """Train to `cfg.steps`; returns a summary (paths, last metrics, last evaluation)."""
        cfg, record, results = self.cfg, {}, {}
        if self.probe is not None and self.step == 0:
            self.snapshot()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress, desc=cfg.loss.method)
        while self.step < cfg.steps:
            tic = time.perf_counter()  # data loading + the step; not snapshots, evaluation or saving
            record = self.train_step(next(self.batches))
            record["samples_per_s"] = cfg.batch_size / (time.perf_counter() - tic)
            self.files.log_metrics(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.due(cfg.snapshot_every):
                self.snapshot()
            if self.eval_fn is not None and (self.due(cfg.eval_every) or self.step in cfg.eval_steps
                                             or self.step == cfg.steps):
                results = self.evaluate()
            if self.due(cfg.save_every) or self.step == cfg.steps:
                self.save()
        bar.close()
        log.info("run %s: finished at step %d, last record %s", self.files.out, self.step, record)
        return {"out": str(self.files.out), "step": self.step, "last": record, "eval": results,
                "checkpoint": str(self.files.checkpoint), "metrics": str(self.files.metrics)}


def fit(cfg: TrainConfig, eval_fn: EvalFn | None = None) -> dict:
    """Train `cfg` (under `torchrun`, with DDP); returns a summary with the run's paths.

    Args:
        cfg: the run's configuration.
        eval_fn: `eval_fn(model, step) -> {name: value}`, called on rank 0 every `cfg.eval_every`
            steps, at `cfg.eval_steps` and at the end; results go to `<out>/eval.jsonl`.
    """
    created = init_distributed()
    try:
        trainer = Trainer(cfg, eval_fn)  # extracts cached features with every thread
        with cpu_threads(1 if cfg.feature_cache and trainer.device.type == "cpu" else None):
            return trainer.run()
    finally:
        RunFiles.close_started()  # train.log and TensorBoard, also when setup failed
        if created:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    """The CLI. `-h` / `--help` lists every option; a bad option or input file (a config, a checkpoint,
    a device, the data) is one line `error: ...` and exit status 2, as argparse does. Errors inside the
    training loop keep their traceback: they are not the command line's fault."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(cli_help())
        raise SystemExit(0)
    pdclip_log = logging.getLogger("pdclip")
    level = pdclip_log.level
    pdclip_log.setLevel(logging.INFO)  # e.g. the data reader's "kept" lines, on the console and in train.log
    console = [pdclip_log] if int(os.environ.get("RANK", "0")) == 0 else []  # one rank talks, under torchrun
    try:
        with logging_redirect_tqdm(loggers=console):  # log lines above the progress bar, not through it
            cfg = parse_cli(argv)
            return fit(cfg, default_eval_fn(cfg) if cfg.eval_every or cfg.eval_steps else None)
    except (ValueError, OSError, ImportError) as e:
        if _in_training_loop(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:  # main() may be called in-process (tests, notebooks): leave logging as it was
        pdclip_log.setLevel(level)


def _in_training_loop(error: BaseException) -> bool:
    """Whether `error` was raised inside `Trainer.run` (after setup: a bug or a failure mid-run)."""
    return any(frame.f_code is Trainer.run.__code__ for frame, _ in traceback.walk_tb(error.__traceback__))


if __name__ == "__main__":
    main()
