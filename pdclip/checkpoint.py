"""Boring, safe checkpoints: atomic writes, `weights_only=True` loads, the config beside the weights.

A checkpoint is a plain dict of tensors, numbers, strings and lists (the config as `to_dict()`, RNG
states as tensors), so `torch.load(..., weights_only=True)` reads it without unpickling code.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from pdclip.config import TrainConfig
from pdclip.models import DualEncoder, load_trainable_state, model_from_config

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: object, path: str | Path) -> None:
    """`torch.save` to `path.tmp`, then rename: a crash mid-write never leaves a half file at `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: object, path: str | Path) -> None:
    """`atomic_save` for JSON: write `path.tmp`, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint (a run directory or a file) on the CPU, without unpickling code."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the loop draws from, as tensors and lists."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    _, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
        "python": [list(py_state), py_gauss],
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])
    py_state, py_gauss = state["python"]
    random.setstate((3, tuple(py_state), py_gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DualEncoder, TrainConfig]:
    """The trained student of a run directory (or checkpoint file), in eval mode, and its config.

    Example:
        >>> model, cfg = load_checkpoint("runs/psd")                          # doctest: +SKIP
        >>> model.encode_image(images)  # (B, D), normalised                  # doctest: +SKIP
    """
    ckpt = read_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = model_from_config(cfg, weights=False)  # offline backbones still load their packaged weights
    load_trainable_state(model, ckpt["model"], ckpt.get("frozen", {}))
    return model.to(device).eval(), cfg


class RunFiles:
    """The run directory: `config.json`, `checkpoint.pt`, `metrics.jsonl`, `eval.jsonl`, `snapshots/`.

    Only the main rank writes. A directory that holds a checkpoint is never silently reused: pass
    `resume` to continue it or `overwrite` to start again.
    """

    # Fields that may change between a run and its resumption without changing the results.
    RESUMABLE_CHANGES = ("out", "resume", "overwrite", "progress", "num_workers", "device", "save_every",
                         "eval_every", "eval_max_samples")

    def __init__(self, out: Path, cfg: TrainConfig, is_main: bool):
        self.out, self.cfg, self.is_main = Path(out), cfg, is_main
        self.checkpoint, self.metrics = self.out / CHECKPOINT, self.out / "metrics.jsonl"
        self.evals, self.snapshots = self.out / "eval.jsonl", self.out / "snapshots"
        if cfg.resume and not self.checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint}")
        if self.checkpoint.is_file() and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(f"{self.out} holds a checkpoint; pass --resume to continue it "
                                  "or --overwrite to start again")

    def start(self, step: int) -> None:
        """Write `config.json`; drop log lines after `step` (a resumed run rewrites them) or, for a
        fresh run, every file of an earlier one."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.cfg.to_dict(), self.out / "config.json")
        for log in (self.metrics, self.evals):
            lines = log.read_text().splitlines() if log.is_file() and step else []
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            log.write_text("".join(line + "\n" for line in kept))
        if step == 0:
            self.checkpoint.unlink(missing_ok=True)
            for old in self.snapshots.glob("step_*.pt"):
                old.unlink()

    def check_resumable(self, saved: dict) -> None:
        """Raise if the config differs from the checkpoint's in anything that changes the results."""
        now = self.cfg.to_dict()
        changed = sorted(k for k in now if k not in self.RESUMABLE_CHANGES and now[k] != saved.get(k))
        if changed:
            raise ValueError(f"cannot resume {self.checkpoint}: the config differs in {changed}")

    def _append(self, path: Path, record: dict) -> None:
        if self.is_main:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def log_metrics(self, record: dict) -> None:
        self._append(self.metrics, record)

    def log_eval(self, step: int, results: dict) -> None:
        self._append(self.evals, {"step": step, **results})

    def save_snapshot(self, step: int, snapshot: dict) -> None:
        if self.is_main:
            self.snapshots.mkdir(parents=True, exist_ok=True)
            atomic_save(snapshot, self.snapshots / f"step_{step:06d}.pt")

    def save_checkpoint(self, state: dict) -> None:
        if self.is_main:
            atomic_save(state, self.checkpoint)
