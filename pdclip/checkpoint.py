"""Boring, safe checkpoints: atomic writes, `weights_only=True` loads, the config beside the weights.

A checkpoint is a plain dict of tensors, numbers, strings and lists (the config as `to_dict()`, RNG
states as tensors), so `torch.load(..., weights_only=True)` reads it without unpickling code.

A run folder holds numbered checkpoints `checkpoint_XXXXXX.pt` (the step; the newest
`keep_checkpoints` are kept) and `checkpoint.pt`, the newest of them (a hard link, so no extra disk;
a copy where the filesystem has no links). "latest" (`--resume latest`, a folder given to
`read_checkpoint`) is the numbered checkpoint with the highest step, else `checkpoint.pt` (runs
written before numbering). The run folder also holds `train.log`: pdclip's log records and what the
run prints.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pdclip.config import TrainConfig
from pdclip.models import DualEncoder, load_trainable_state, model_from_config

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
NUMBERED = re.compile(r"checkpoint_(\d+)\.pt")


class CheckpointError(ValueError):
    """A file that is not a readable pdclip checkpoint: empty, truncated, or holding pickled objects."""


def atomic_save(obj: object, path: str | Path) -> None:
    """`torch.save` to `path.tmp`, then rename: a crash mid-write never leaves a half file at `path`
    (a kill leaves `path.tmp`, which `RunFiles.start` removes on the next run)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except BaseException:  # e.g. a full disk: no half file stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_json(obj: object, path: str | Path) -> None:
    """`atomic_save` for JSON: write `path.tmp`, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def numbered_checkpoints(folder: str | Path) -> list[Path]:
    """The folder's `checkpoint_XXXXXX.pt` files, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint_*.pt") if (m := NUMBERED.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint of a run folder: the highest-step numbered one, else `checkpoint.pt`."""
    numbered = numbered_checkpoints(folder)
    legacy = Path(folder) / CHECKPOINT
    return numbered[-1] if numbered else legacy if legacy.is_file() else None


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint (a file, or a run folder's latest) on the CPU, without unpickling code.

    Raises:
        FileNotFoundError: no such file, or a folder without checkpoints.
        CheckpointError: the file is empty, truncated, or not a pdclip checkpoint; the message names it.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} (checkpoint_XXXXXX.pt or {CHECKPOINT})")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint: delete it, or resume from "
                              "an older one with --resume PATH")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Not chained: torch's own message advises weights_only=False, i.e. running the file's code.
        raise CheckpointError(f"{path} holds non-tensor Python objects, so it is not a pdclip checkpoint "
                              "(pdclip writes only tensors, numbers and strings); give a file that "
                              "python -m pdclip.train wrote") from None
    except (EOFError, RuntimeError) as e:  # torch: "PytorchStreamReader failed reading zip archive"
        reason = str(e).split(".")[0] or type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}): delete it, or resume from "
                              "an older one with --resume PATH") from None


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
    """The run folder: `config.json`, checkpoints, `metrics.jsonl`, `eval.jsonl`, `train.log`,
    `snapshots/` (and `tensorboard/` with `report_to="tensorboard"`).

    Only the main rank writes. A folder that holds a checkpoint is never silently reused: pass
    `resume` to continue it or `overwrite` to start again.
    """

    started: RunFiles | None = None  # the run whose train.log is open: one at a time per process
    # Fields that may change between a run and its resumption without changing the results.
    RESUMABLE_CHANGES = ("out", "resume", "overwrite", "progress", "num_workers", "device", "save_every",
                         "eval_every", "eval_steps", "eval_max_samples", "keep_checkpoints", "report_to", "val_data")

    def __init__(self, out: Path, cfg: TrainConfig, is_main: bool):
        self.out, self.cfg, self.is_main = Path(out), cfg, is_main
        self.checkpoint, self.metrics = self.out / CHECKPOINT, self.out / "metrics.jsonl"
        self.evals, self.snapshots, self.log_file = self.out / "eval.jsonl", self.out / "snapshots", self.out / "train.log"
        self.resume_from = self._resume_path()
        self._log, self._writer = None, None
        self._tensorboard = _summary_writer() if cfg.report_to == "tensorboard" and is_main else None

    def _resume_path(self) -> Path | None:
        """The checkpoint `cfg.resume` names ("latest": the folder's newest; a file; a run folder)."""
        resume, found = self.cfg.resume, latest_checkpoint(self.out)
        if resume is None:
            if found is not None and not self.cfg.overwrite:
                raise FileExistsError(f"{self.out} holds a checkpoint ({found.name}); pass --resume latest to "
                                      "continue it or --overwrite to start again")
            return None
        path = self.out if resume == "latest" else Path(resume)
        found = latest_checkpoint(path) if path.is_dir() else path if path.is_file() else None
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint {'in' if path.is_dir() else 'at'} {path}; "
                                    "give a checkpoint_XXXXXX.pt file, or drop --resume to start afresh")
        return found

    def start(self, step: int) -> None:
        """Open `train.log`, write `config.json`; drop log lines and checkpoints after `step` (a
        resumed run rewrites them) or, for a fresh run, every file of an earlier one."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        RunFiles.close_started()
        RunFiles.started, self._log = self, _RunLog(self.log_file, append=step > 0)
        for tmp in (*self.out.glob("*.tmp"), *self.snapshots.glob("*.tmp")):
            log.warning("removed %s: a write cut short by an earlier run (the files it would replace are intact)", tmp)
            tmp.unlink()
        atomic_write_json(self.cfg.to_dict(), self.out / "config.json")
        for path in (self.metrics, self.evals):
            lines = path.read_text().splitlines() if path.is_file() and step else []
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
        later = [p for p in numbered_checkpoints(self.out) if int(NUMBERED.fullmatch(p.name).group(1)) > step]
        if step == 0:
            later += [self.checkpoint, *self.snapshots.glob("step_*.pt"), *self.out.glob("tensorboard/events.*")]
        elif later:  # checkpoint.pt links the newest of them; until the next save, latest is `step`'s
            log.warning("resuming at step %d: deleted the later checkpoints %s", step, [p.name for p in later])
            later.append(self.checkpoint)
        for old in later:
            old.unlink(missing_ok=True)
        if self._tensorboard is not None:  # purge_step: a resumed run's events replace those after `step`
            self._writer = self._tensorboard(str(self.out / "tensorboard"), purge_step=step or None)
        log.info("run %s: %s at step %d of %d", self.out, "resumed" if step else "started", step, self.cfg.steps)

    @classmethod
    def close_started(cls) -> None:
        """Flush and detach the started run's `train.log` and TensorBoard writer (`fit` calls it at the
        end, also when setup failed after `start`: stdout must not stay redirected)."""
        run, cls.started = cls.started, None
        if run is not None:
            for part in (run._writer, run._log):
                if part is not None:
                    part.close()
            run._log = run._writer = None

    def check_resumable(self, saved: dict) -> None:
        """Raise if the config differs from the checkpoint's in anything that changes the results."""
        now = self.cfg.to_dict()
        changed = sorted(k for k in now if k not in self.RESUMABLE_CHANGES and now[k] != saved.get(k))
        if changed:
            raise ValueError(f"cannot resume {self.resume_from}: the config differs in {changed}")

    def _append(self, path: Path, record: dict) -> None:
        if self.is_main:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _report(self, prefix: str, step: int, record: dict) -> None:
        if self._writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step":
                    self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def log_metrics(self, record: dict) -> None:
        self._append(self.metrics, record)
        self._report("train", record["step"], record)

    def log_eval(self, step: int, results: dict) -> None:
        self._append(self.evals, {"step": step, **results})
        self._report("eval", step, results)
        if self.is_main and results:
            log.info("step %d evaluation: %s", step, json.dumps(results))

    def save_snapshot(self, step: int, snapshot: dict) -> None:
        if self.is_main:
            self.snapshots.mkdir(parents=True, exist_ok=True)
            atomic_save(snapshot, self.snapshots / f"step_{step:06d}.pt")

    def save_checkpoint(self, state: dict) -> Path:
        """Write `checkpoint_<step>.pt`, point `checkpoint.pt` at it, delete the oldest beyond
        `keep_checkpoints`; returns the numbered file."""
        path = self.out / f"checkpoint_{state['step']:06d}.pt"
        if not self.is_main:
            return path
        atomic_save(state, path)
        tmp = self.checkpoint.with_name(CHECKPOINT + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # no hard links (some network or FUSE filesystems)
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.checkpoint)
        keep = self.cfg.keep_checkpoints
        for old in numbered_checkpoints(self.out)[:-keep] if keep else []:
            old.unlink()
        log.info("step %d: saved %s", state["step"], path)
        return path


def _summary_writer() -> type:
    """`torch.utils.tensorboard.SummaryWriter`, or an ImportError that says how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--report-to tensorboard needs the tensorboard package: "
                          "pip install 'pdclip[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


class _RunLog:
    """`train.log` while a run lasts: the `pdclip` loggers' INFO records and everything printed to stdout."""

    def __init__(self, path: Path, append: bool):
        self.handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.logger = logging.getLogger("pdclip")
        self.level = self.logger.level
        if not self.logger.isEnabledFor(logging.INFO):  # e.g. the data reader's "kept" lines
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        self.stdout = sys.stdout
        sys.stdout = _Tee(self.stdout, self.handler.stream)

    def close(self) -> None:
        if isinstance(sys.stdout, _Tee) and sys.stdout.file is self.handler.stream:
            sys.stdout = self.stdout
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        self.handler.close()


class _Tee:
    """A stdout that also writes to the run's log file (the feature cache's and evaluation's prints)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if not self.file.closed:  # a run that was never closed: logging closes its file at exit
            self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)
