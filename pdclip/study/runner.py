"""The study's runner: a cell's training configuration, one cell's run, and the resumable grid.

`run_grid` skips cells whose `result.json` exists, so an interrupted study resumes. Each result holds
every `pdclip.evaluate` metric at the step chosen on validation (`pdclip.selection.KeepBest`) and at
the last step, the metrics against steps, the test split's per-image outcomes (for bootstraps), the
soft-target quality over training and the wall time. `reference_probes` adds the raw backbone's probe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path

from pdclip.config import LossConfig, TrainConfig
from pdclip.study.presets import SETTINGS, headline
from pdclip.study.results import check_base, load_results


def train_config(cell: dict, base: dict, run_dir: Path) -> TrainConfig:
    """The `TrainConfig` of a cell: the preset's shared settings, the cell's data, tower and targets."""
    # A variant's keys are LossConfig fields, TrainConfig fields (OTTER's init_logit_scale_soft), or
    # else the dataset's keywords (clip art's category_in_caption).
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    loss = {k: v for k, v in cell["variant"].items() if k in loss_fields}
    train = {k: v for k, v in cell["variant"].items() if k in train_fields}
    data = dict(base.get("data_kwargs", {}).get(cell["dataset"], {}))
    data.update({k: v for k, v in cell["variant"].items() if k not in loss_fields | train_fields})
    if cell["dataset"] == "synthetic":
        data.update(n_train=cell["n_train"], n_eval=base["n_eval"],
                    p_mismatch=cell["noise"] / 2, p_vague=cell["noise"] / 2)
    elif cell["noise"] is not None:  # clip art: the noise level is the share of mismatched captions
        data["caption_noise"] = cell["noise"]
    run = {k: v for k, v in base.items() if k in ("steps", "warmup_steps", "batch_size", "snapshot_every", "lr",
                                                  "weight_decay", "eval_steps")}
    run.update(train)  # a variant may change the budget too (a shorter run: fewer epochs)
    return TrainConfig(dataset=cell["dataset"], data_kwargs=data, model=base["model"],
                       **SETTINGS[cell["setting"]], precision="fp32", seed=cell["seed"], out=str(run_dir),
                       overwrite=True, progress=False, save_every=run["steps"],
                       loss=LossConfig(method=cell["method"], **loss), **run)


def eval_splits(dataset: str) -> tuple[str, ...]:
    """The splits a cell is scored on (the synthetic source also has two shifted test splits)."""
    return ("train", "val", "test") + (("shift", "shift_mild") if dataset == "synthetic" else ())


def build_feature_caches(cells: list[dict], base: dict, log: Callable[[str], None] = print) -> None:
    """Extract the backbone features of every dataset the frozen-tower cells read, once, with every
    thread, before the cells run: two parallel cells would otherwise extract the same cache side by side."""
    from pdclip.features import CachedFeatures
    from pdclip.models import model_from_config

    models, done = {}, set()
    for cell in cells:
        cfg = train_config(cell, base, Path("unused"))
        key = json.dumps([cell["setting"], cfg.dataset, cfg.data_kwargs, cfg.feature_views], sort_keys=True)
        if not cfg.feature_cache or key in done:
            continue
        done.add(key)
        log(f"feature caches for {cfg.dataset} {cfg.data_kwargs}")
        towers = cell["setting"]  # one model per tower setting: its heads are not used
        if towers not in models:
            models[towers] = model_from_config(cfg)
        for split in eval_splits(cfg.dataset):
            CachedFeatures(models[towers], cfg.dataset, split, cfg.data_kwargs, root=cfg.feature_cache_dir,
                           views=cfg.feature_views if split == "train" else 1)


def run_cell(cell: dict, base: dict, cell_dir: Path) -> dict:
    """Train one cell, evaluate it on every split at the step chosen on validation and at the last
    step, score its soft targets; returns the result dict.

    Every metric uses the whole split (the linear probe's C is chosen on val); the checkpoint is
    deleted afterwards (metrics.jsonl and snapshots stay).
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)  # one core per run: parallel runs (--jobs) do not fight over threads
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random towers have no weights
    # NumPy/scikit-learn's BLAS threads too: on a busy machine a threaded linear probe ran 7x slower.
    with threadpool_limits(1):
        return _run_cell(cell, base, cell_dir)


def eval_data(model, cfg: TrainConfig, splits: tuple[str, ...]):
    """`(encoder, {split: dataset})` that scores `model` on `splits`: the heads on cached backbone
    features for frozen towers (the full towers' numbers, cheaper), else the model on the images."""
    from pdclip.data import build_dataset

    kwargs = {"image_size": model.image_size, **cfg.data_kwargs, "augment": False}  # frozen features
    if cfg.feature_cache:
        from pdclip.features import cached_splits

        return cached_splits(model, cfg.dataset, splits, kwargs, cfg.feature_cache_dir)
    return model, {s: build_dataset(cfg.dataset, s, **kwargs) for s in splits}


# The scores each run's budget is chosen on (validation), and the columns read at that step: zero-shot
# at the best val headline score, retrieval at the best val image→text R@1 (`pdclip.study.tables`).
SELECTIONS = {"zeroshot": "val/{h}", "retrieval": "val/retrieval/i2t_R@1"}


def _run_cell(cell: dict, base: dict, cell_dir: Path) -> dict:
    """`run_cell`'s work, once the thread limits are set."""
    from pdclip.checkpoint import load_checkpoint
    from pdclip.evaluate import evaluate_samples, run_target_quality
    from pdclip.selection import KeepBest
    from pdclip.train import fit

    tic, cpu = time.perf_counter(), time.process_time()
    cfg = train_config(cell, base, cell_dir / "run")
    keys = {name: key.format(h=headline(cell["dataset"])) for name, key in SELECTIONS.items()}
    keep = KeepBest(lambda m: eval_data(m, cfg, ("val",)), keys)
    summary = fit(cfg, keep if cfg.eval_steps else None)
    train_s = time.perf_counter() - tic
    model, _ = load_checkpoint(summary["checkpoint"], "cpu")
    encoder, datasets = eval_data(model, cfg, eval_splits(cell["dataset"]))
    # The training split only feeds the linear probe, which runs at the last step and the zero-shot
    # budget; the shifted splits are scored at the zero-shot budget (effective robustness is read there).
    core = {s: datasets[s] for s in ("train", "val", "test")}
    budgets = {"final": (cfg.steps, *evaluate_samples(encoder, core, probe_only=("train",)))}
    for name in keys if cfg.eval_steps else ():
        step = keep.restore(model, name)
        if name != "zeroshot" and step == keep.best_step["zeroshot"]:  # the same weights: the same scores
            budgets[name] = budgets["zeroshot"]
            continue
        needs = datasets if name == "zeroshot" else {s: datasets[s] for s in ("val", "test")}
        budgets[name] = (step, *evaluate_samples(encoder, needs, probe_only=("train",)))
    # The probe is read at the zero-shot step or the last, whichever its own validation accuracy prefers.
    probe = max(budgets, key=lambda b: budgets[b][1].get("linear_probe/val_acc", -1.0))
    quality = (run_target_quality(cfg.out, datasets["train"], cfg.loss.mix_alpha)
               if hasattr(datasets["train"], "true_correspondence") else [])
    Path(summary["checkpoint"]).unlink()  # the results are all in result.json
    return {"cell": cell, "budgets": {b: {"step": step, "metrics": scores, "samples": _test_samples(samples)}
                                      for b, (step, scores, samples) in budgets.items()},
            "probe_budget": probe, "curve": keep.curve, "target_quality": quality,
            "train_curve": train_curve(Path(summary["metrics"])),
            "train_s": train_s, "wall_s": time.perf_counter() - tic, "cpu_s": time.process_time() - cpu}


TRAIN_CURVE = ("train_confidence", "target_offdiag", "alpha")  # the per-step parts a result keeps


def train_curve(metrics: Path, points: int = 30) -> list[dict]:
    """The student's confidence on its training pairs and its targets' off-diagonal mass against
    steps: `points` windows of `metrics.jsonl`, each the mean of its steps (per-batch values are noisy)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    size = max(1, len(rows) // points)
    out = []
    for start in range(0, len(rows), size):
        window = rows[start:start + size]
        out.append({"step": window[-1]["step"], **{k: sum(r[k] for r in window) / len(window)
                                                   for k in TRAIN_CURVE if k in window[0]}})
    return out


def _test_samples(samples: dict) -> dict:
    """The per-image outcomes the report bootstraps: the test split's and the probe's."""
    return {k: samples[k] for k in ("test", "linear_probe") if k in samples}


def reference_probes(cells: list[dict], base: dict, out: Path, log: Callable[[str], None] = print) -> None:
    """The linear probe on the raw frozen backbone features (no head), once per dataset and training
    set, into `<out>/reference/<dataset>[-n<n_train>].json`: the row a trained head's probe is read against."""
    import torch

    from pdclip.checkpoint import atomic_write_json
    from pdclip.features import CachedFeatures
    from pdclip.metrics import linear_probe_predictions
    from pdclip.models import model_from_config

    for cell in cells:
        cfg = train_config(cell, base, Path("unused"))
        path = out / "reference" / f"{reference_name(cell)}.json"
        if not cfg.feature_cache or path.exists():
            continue
        log(f"raw-backbone linear probe: {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        model = model_from_config(cfg).eval()
        raw = []
        for split in ("train", "val", "test"):
            feats = CachedFeatures(model, cfg.dataset, split, cfg.data_kwargs, root=cfg.feature_cache_dir)
            batch = feats.get_batch([(0, i) for i in range(len(feats))])
            with torch.no_grad():  # the pretrained blocks after a trunk's cut, if any: the raw backbone's features
                raw.append((model.visual.backbone.tail(batch["image_raw"]), batch["label"]))
        scores, pred = linear_probe_predictions(*raw)
        atomic_write_json({**scores, "samples": {"pred": pred.tolist(), "label": raw[2][1].tolist()}}, path)


def reference_name(cell: dict) -> str:
    """What a raw-backbone probe depends on: the images and labels (not the captions, not the method)."""
    return cell["dataset"] + ("" if cell["n_train"] is None else f"-n{cell['n_train']}")


def _run_and_save(run_fn: Callable, cell: dict, base: dict, cell_dir: Path) -> dict:
    """`run_fn(cell, base, cell_dir)`, then write `result.json` atomically (its presence means done)."""
    from pdclip.checkpoint import atomic_write_json  # torch: only where cells run

    cell_dir.mkdir(parents=True, exist_ok=True)
    result = run_fn(cell, base, cell_dir)
    atomic_write_json(result, cell_dir / "result.json")
    return result


def run_grid(cells: list[dict], base: dict, out: str | Path, run_fn: Callable = run_cell, jobs: int = 1,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell whose `<out>/cells/<id>/result.json` is missing; returns all results, in cell order.

    Args:
        cells: from `expand`.
        base: the preset's shared settings.
        run_fn: `run_fn(cell, base, cell_dir) -> dict` (`run_cell`; tests pass a fake).
        jobs: parallel processes (each one thread); 1 runs in this process.
    """
    out = Path(out)
    check_base(out, base)
    todo = [c for c in cells if not (out / "cells" / c["id"] / "result.json").exists()]
    log(f"{len(cells) - len(todo)} of {len(cells)} cells done; running {len(todo)} with {jobs} job(s)")
    tic = time.perf_counter()
    if run_fn is run_cell:
        build_feature_caches(todo, base, log)
        reference_probes(cells, base, out, log)
    with ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=get_context("spawn")))
            futures = [pool.submit(_run_and_save, run_fn, c, base, out / "cells" / c["id"]) for c in todo]
            results = (f.result() for f in futures)
        else:
            results = (_run_and_save(run_fn, c, base, out / "cells" / c["id"]) for c in todo)
        for i, (cell, result) in enumerate(zip(todo, results, strict=True), 1):
            log(f"[{i}/{len(todo)}] {cell['id']}: {result['wall_s']:.0f} s (elapsed {time.perf_counter() - tic:.0f} s)")
    return load_results(out, cells)
