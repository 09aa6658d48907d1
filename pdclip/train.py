"""One training loop for every method: `fit(cfg)` and the CLI.

    python -m pdclip.train --method psd --dataset synthetic --steps 300 --out runs/psd
    python -m pdclip.train --config tutorial_cpu --method otter --out runs/otter
    torchrun --nproc_per_node=2 -m pdclip.train --method otter --out runs/ddp   # DDP, soft targets on the global batch

A method is only a name here: `pdclip.methods.method_loss` maps it to targets and a loss. The loop adds
what every method shares: warm-up + cosine lr, AMP on a GPU, gradient clipping, the teacher network
(`pdclip.teacher`: EMA for KD / OTTER, EMA or snapshot for PSD), per-step metrics
(`<out>/metrics.jsonl`), snapshots of a fixed probe batch's logits and
targets (`<out>/snapshots/step_XXXXXX.pt`, for the visualisation notebook), an evaluation hook
(`<out>/eval.jsonl`) and checkpoints that resume exactly (`<out>/checkpoint.pt`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pdclip.checkpoint import RunFiles, load_checkpoint, read_checkpoint, rng_state, set_rng_state
from pdclip.config import TrainConfig, parse_cli
from pdclip.data import build_dataset
from pdclip.data.sampling import make_batches, probe_batch
from pdclip.distributed import gather_features, world
from pdclip.features import CachedFeatures, HeadsOnly, cpu_threads
from pdclip.methods import MethodOutput, method_loss
from pdclip.models import DualEncoder, load_trainable_state, model_from_config, trainable_state
from pdclip.positives import caption_keys, image_keys
from pdclip.schedules import lr_at, psd_alpha
from pdclip.teacher import make_teacher
from pdclip.towers import ImageBackbone

EvalFn = Callable[[DualEncoder, int], dict[str, float]]
__all__ = ["fit", "load_checkpoint", "Trainer", "NonFiniteLossError", "main"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; training stopped before the update, the last checkpoint is intact."""


class Trainer:
    """The state of one run: model (+ DDP wrapper), optimiser, scaler, teacher, RNG, step."""

    def __init__(self, cfg: TrainConfig, eval_fn: EvalFn | None = None):
        self.cfg, self.eval_fn = cfg, eval_fn
        self.rank, self.world_size = world()
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":  # TF32 for the fp32 matmuls and convolutions left outside autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.files = RunFiles(Path(cfg.out), cfg, is_main=self.rank == 0)
        torch.manual_seed(cfg.seed)
        self.model = model_from_config(cfg).to(self.device)
        self.dataset = self.train_data()
        self.optimizer = make_optimizer(self.model, cfg)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.teacher = make_teacher(self.model, cfg.loss)  # EMA / snapshot copy, or None
        self.generator = torch.Generator().manual_seed(cfg.seed)  # PSD's subsets: the same on every rank
        self.step, self.saved_step = 0, None
        if cfg.resume:
            self.restore(read_checkpoint(self.files.checkpoint))
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
                                    self.rank, self.world_size, self.step)
        self.probe = (probe_batch(self.dataset, cfg.snapshot_size, cfg.seed, self.rank, self.world_size)
                      if cfg.snapshot_every else None)

    def forward_loss(self, net: torch.nn.Module, batch: dict, alpha: float, generator: torch.Generator) -> tuple[MethodOutput, dict]:
        """Teacher (if any) and student forward, then the method's loss on the global batch."""
        images, tokens = self.inputs(batch)
        teacher = {}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.teacher_net is not None:
                with torch.no_grad():
                    teacher = {"teacher_image_features": self.teacher_net.encode_image(images).float(),
                               "teacher_text_features": self.teacher_net.encode_text(tokens).float(),
                               "teacher_logit_scale": self.teacher_net.scales()[0].float()}
            out = net(images, tokens)
        # Targets (softmax, Sinkhorn) run in float32 whatever the autocast dtype.
        result = method_loss(self.cfg.loss, out["image_features"].float(), out["text_features"].float(),
                             out["logit_scale"].float(), logit_scale_soft=out["logit_scale_soft"].float(),
                             alpha=alpha, generator=generator, **teacher, **self.positive_keys(batch, images))
        return result, out

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
        if not cfg.feature_cache:
            return build_dataset(cfg.dataset, "train", **{"image_size": self.model.image_size, **cfg.data_kwargs})
        if self.rank > 0:
            dist.barrier()
        features = CachedFeatures(self.model, cfg.dataset, "train", cfg.data_kwargs, views=cfg.feature_views,
                                  root=cfg.feature_cache_dir)
        if self.rank == 0 and self.world_size > 1:
            dist.barrier()
        return features

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What the towers take, on the device: images `(B, 3, H, W)` and token ids `(B, L)`, or with
        the feature cache the backbones' outputs `(B, F)` and `(B, F_t)`."""
        if self.cfg.feature_cache:
            images, tokens = batch["image_raw"], batch["text_raw"]
        else:
            images, tokens = batch["image"], self.model.tokenize(batch["text"])
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
        result, out = self.forward_loss(self.net, batch, alpha, self.generator)
        if not torch.isfinite(result.loss):
            kept = f"{self.files.checkpoint} (step {self.saved_step})" if self.saved_step else "no checkpoint yet"
            raise NonFiniteLossError(f"loss is {result.loss.item()} at step {step + 1}; stopped before the update. "
                                     f"Last good checkpoint: {kept}. Try a lower --lr, --precision=fp32 or check the data.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result.loss).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.clamp_scales_()
        self.step += 1
        return {"step": self.step, **result.parts, "alpha": alpha, "lr": lr,
                "logit_scale": out["logit_scale"].item(), "logit_scale_soft": out["logit_scale_soft"].item()}

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
                "teacher": self.teacher.state_dict() if self.teacher else {}, "rng": rng_state(self.generator)}

    def restore(self, ckpt: dict) -> None:
        self.files.check_resumable(ckpt["config"])
        load_trainable_state(self.model, ckpt["model"], ckpt.get("frozen", {}))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.teacher is not None:
            self.teacher.load_state_dict(ckpt["teacher"])
        set_rng_state(ckpt["rng"], self.generator)
        self.step = self.saved_step = ckpt["step"]

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
            if self.eval_fn is not None and (self.due(cfg.eval_every) or self.step == cfg.steps):
                results = self.evaluate()
            if self.due(cfg.save_every) or self.step == cfg.steps:
                self.save()
        bar.close()
        return {"out": str(self.files.out), "step": self.step, "last": record, "eval": results,
                "checkpoint": str(self.files.checkpoint), "metrics": str(self.files.metrics)}


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a small tensor from every rank, in rank order (the order `method_loss` gathers)."""
    return gather_features(x, with_grad=False).cpu()


# ---------------------------------------------------------------- setup helpers


def init_distributed() -> bool:
    """Join the process group `torchrun` describes (NCCL on GPUs, gloo on CPUs); True if we created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`None` for fp32; "auto" is bf16 on GPUs that have it, fp16 (+ a gradient scaler) on others (T4)."""
    if precision == "auto":
        cuda = device.type == "cuda"
        # Native bf16 only (compute capability >= 8): a T4 "supports" it by emulation, slowly.
        precision = "fp32" if not cuda else "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 (or bf16) on a CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(model: DualEncoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; like open_clip, gains, biases and temperatures get no weight decay.

    The trainable weights of an offline pretrained image backbone (`pdclip.towers.ImageBackbone`) get
    their own groups with `lr_scale = cfg.pretrained_lr_scale`: `train_step` sets their lr to
    `lr_scale` x the schedule's, so the new head moves fast without wiping the ImageNet features.
    A trainable pretrained text backbone keeps the full rate, as in the study's recorded runs.
    """
    backbone = getattr(model.visual, "backbone", None)
    pretrained = {id(p) for p in backbone.parameters()} if isinstance(backbone, ImageBackbone) else set()
    decay, no_decay, pretrained_decay, pretrained_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            if id(p) in pretrained:
                (pretrained_no_decay if exempt else pretrained_decay).append(p)
            else:
                (no_decay if exempt else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    # Added only when present, so the checkpoints of runs without them keep resuming.
    groups += [{"params": params, "weight_decay": wd, "lr_scale": cfg.pretrained_lr_scale}
               for params, wd in ((pretrained_no_decay, 0.0), (pretrained_decay, cfg.weight_decay)) if params]
    # Fused kernels: about 3x faster steps on a CPU, where the 49408-token embedding dominates.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def fit(cfg: TrainConfig, eval_fn: EvalFn | None = None) -> dict:
    """Train `cfg` (under `torchrun`, with DDP); returns a summary with the run's paths.

    Args:
        cfg: the run's configuration.
        eval_fn: `eval_fn(model, step) -> {name: value}`, called on rank 0 every `cfg.eval_every`
            steps and at the end; results go to `<out>/eval.jsonl`.
    """
    created = init_distributed()
    try:
        trainer = Trainer(cfg, eval_fn)  # extracts cached features with every thread
        with cpu_threads(1 if cfg.feature_cache and trainer.device.type == "cpu" else None):
            return trainer.run()
    finally:
        if created:
            dist.destroy_process_group()


def default_eval_fn(cfg: TrainConfig) -> EvalFn:
    """The CLI's periodic evaluation: `pdclip.evaluate` on the dataset's val split, no linear probe."""
    from pdclip.evaluate import evaluate_model  # only the CLI needs it

    cache = {}

    def evaluate(model: DualEncoder, step: int) -> dict[str, float]:
        if not cache and cfg.feature_cache:  # the val split's backbone features, extracted on first use
            cache["val"] = CachedFeatures(model, cfg.dataset, "val", cfg.data_kwargs, root=cfg.feature_cache_dir)
        elif not cache:  # built on first use, at the model's image size
            cache["val"] = build_dataset(cfg.dataset, "val", **{"image_size": model.image_size, **cfg.data_kwargs})
        device = next(model.parameters()).device
        encoder = HeadsOnly(model, cache.values()) if cfg.feature_cache else model
        return evaluate_model(encoder, cache, device=device, max_samples=cfg.eval_max_samples, linear_probe=False)

    return evaluate


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    return fit(cfg, default_eval_fn(cfg) if cfg.eval_every else None)


if __name__ == "__main__":
    main()
