"""The reproduction study: a grid of training runs, a resumable runner, aggregation and figures.

    python -m pdclip.study --preset quick --out runs/study-quick --results docs/results.md
    python -m pdclip.study --preset full --out runs/study --jobs 2 --results docs/results.md

A preset is plain data (`PRESETS`): shared training settings plus named experiments, each a product
of methods x settings x noise levels x training-set sizes x variants (LossConfig or TrainConfig
fields) x seeds. `expand` turns it into cells; a cell's id comes from its configuration only, so a
cell shared by two experiments runs once. `run_grid` skips cells whose `result.json` exists, so an interrupted study resumes. Each
result holds every `pdclip.evaluate` metric, the soft-target quality over training and the wall
time. `pdclip.study_report` turns the results into tables, figures and `docs/results.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pdclip.config import METHODS, LossConfig, TrainConfig, load_config

# PSD's teachers against the default one (`{}`), with the degenerate control: the same forward's
# predictions at T = 1 make PSD a per-row reweighted CLIP (notebook 03); it shows what a teacher adds.
PSD_REWEIGHTED_CLIP = {"psd_teacher": "self", "psd_temperature": 1.0}
PSD_TEACHER_VARIANTS = [PSD_REWEIGHTED_CLIP, {"psd_teacher": "self", "psd_temperature": 2.0},
                        *({"psd_teacher": t} for t in ("ema", "snapshot", "intra") if t != LossConfig.psd_teacher)]
CONTROLS = {json.dumps(PSD_REWEIGHTED_CLIP, sort_keys=True): "control: a reweighted CLIP"}  # report labels

# Settings shared by every cell of a preset ("base") and the experiments that vary them. A noise
# level `nu` splits evenly into mismatched and vague captions (`p_mismatch = p_vague = nu / 2`), so
# nu = 0.4 is the synthetic source's default; near-duplicates (10 %) stay in every level.
PRESETS: dict[str, dict] = {
    "quick": {
        "about": "synthetic, noise {0, 0.8}, 5 methods, 3 seeds, from-scratch towers, 100 steps",
        "base": {"model": "pdclip-vit-tiny", "steps": 100, "warmup_steps": 10, "batch_size": 64,
                 "n_train": 2000, "n_eval": 300, "snapshot_every": 20},
        "experiments": {
            "noise": {"dataset": "synthetic", "settings": ["scratch"], "noise": [0.0, 0.8]},
        },
    },
    "full": {
        "about": "synthetic noise sweep, data-size sweep, MiniLM text tower, clip art, PSD and OTTER ablations, 300 steps",
        "base": {"model": "pdclip-vit-tiny", "steps": 300, "warmup_steps": 30, "batch_size": 64,
                 "n_train": 2000, "n_eval": 500, "snapshot_every": 50},
        "experiments": {
            "noise": {"dataset": "synthetic", "settings": ["scratch"], "noise": [0.0, 0.2, 0.4, 0.6, 0.8]},
            "size": {"dataset": "synthetic", "settings": ["scratch"], "noise": [0.4],
                     "n_train": [2000, 4000, 8000]},
            "pretrained": {"dataset": "synthetic", "settings": ["scratch", "pretrained"], "noise": [0.4]},
            "clipart": {"dataset": "clipart", "settings": ["scratch"]},  # MiniLM here: +31 min, over budget
            "psd_ablation": {"dataset": "synthetic", "settings": ["scratch"], "noise": [0.4],
                             "methods": ["psd"],
                             "variants": [{}, {"psd_subset": 0.25}, {"psd_subset": 1.0},
                                          {"psd_alpha_max": 0.25}, {"psd_alpha_max": 0.8},
                                          {"psd_schedule": "constant"}, {"psd_schedule": "cosine"},
                                          *PSD_TEACHER_VARIANTS]},
            # OTTER's towers died in the MiniLM setting: is its soft temperature's start, exp(3.9) ~ 49
            # against CLIP's 1/0.07 ~ 14, the cause? A TrainConfig field, so a variant may set it too.
            "otter_ablation": {"dataset": "synthetic", "settings": ["scratch", "pretrained"], "noise": [0.4],
                               "methods": ["otter"],
                               "variants": [{}, {"init_logit_scale_soft": round(math.log(1 / 0.07), 4)}]},
        },
    },
    "frozen": {
        "about": "frozen pretrained towers (EfficientNet-Lite0 + MiniLM, cached features), trained heads: "
                 "synthetic and clip-art noise sweeps, a size sweep, PSD / OTTER / multi-positive ablations, 5 seeds",
        # 750 steps, half the frozen_cpu recipe's: on val, synthetic CLIP has plateaued by step 250 and
        # clip art's zero-shot by 500 (its R@1 gains 2 points more by 1500); it halves the study's time.
        "base": {"model": "pdclip-vit-tiny", "steps": 750, "warmup_steps": 100, "batch_size": 128, "lr": 1e-3,
                 "weight_decay": 0.1, "n_train": 2000, "n_eval": 500, "snapshot_every": 125,
                 "data_kwargs": {"clipart": {"cache_size": 128}}},
        "seeds": (0, 1, 2, 3, 4),
        "experiments": {
            "noise": {"dataset": "synthetic", "settings": ["frozen"], "noise": [0.0, 0.2, 0.4, 0.6]},
            "clipart_noise": {"dataset": "clipart", "settings": ["frozen"], "noise": [0.0, 0.2, 0.4, 0.6]},
            "size": {"dataset": "synthetic", "settings": ["frozen"], "noise": [0.4], "n_train": [1000, 2000, 4000]},
            "psd_ablation": {"dataset": "clipart", "settings": ["frozen"], "noise": [0.4], "methods": ["psd"],
                             "variants": [{}, *PSD_TEACHER_VARIANTS]},
            # The paper's soft-temperature start, exp(3.9) ~ 49, against CLIP's 1/0.07 ~ 14 (the default's
            # trigger of the from-scratch collapse), on both sources.
            "otter_ablation": {"dataset": "clipart", "settings": ["frozen"], "noise": [0.4], "methods": ["otter"],
                               "variants": [{}, {"init_logit_scale_soft": round(math.log(1 / 0.07), 4)}]},
            "otter_ablation_synthetic": {"dataset": "synthetic", "settings": ["frozen"], "noise": [0.4],
                                         "methods": ["otter"],
                                         "variants": [{}, {"init_logit_scale_soft": round(math.log(1 / 0.07), 4)}]},
            # Identical captions as positives (docs/methods.md §8), for CLIP and for a soft-target method.
            **{f"multi_positive_{m}": {"dataset": "synthetic", "settings": ["frozen"], "noise": [0.0, 0.2, 0.4, 0.6],
                                       "methods": [m], "variants": [{}, {"multi_positive": True}]}
               for m in ("clip", "otter")},
        },
    },
}
SEEDS = (0, 1, 2)
# The frozen regime's towers and heads: exactly those of the shipped `frozen_cpu` recipe.
FROZEN_FIELDS = ("pretrained_text", "freeze_text", "pretrained_image", "freeze_image", "image_size", "head",
                 "head_hidden", "embed_dim", "feature_cache")
SETTINGS: dict[str, dict] = {  # a cell's towers: TrainConfig fields
    "scratch": {},  # pdclip-vit-tiny, both towers from random initialisation
    "pretrained": {"pretrained_text": "all-MiniLM-L6-v2"},  # the MiniLM text tower, fine-tuned
    "frozen": {k: v for k, v in load_config("frozen_cpu").to_dict().items() if k in FROZEN_FIELDS},
}
HEADLINE = "zeroshot/colour_shape/top1"  # the synthetic source's hardest zero-shot task


def headline(dataset: str) -> str:
    """The zero-shot score a dataset is ranked by. Clip art's one task, "category", is unbalanced
    (the largest class holds ~30 % of the test images), so it is ranked by balanced accuracy."""
    return HEADLINE if dataset == "synthetic" else "zeroshot/category/mean_per_class_recall"


def cell_id(cell: dict) -> str:
    """A directory name that depends only on the cell's configuration (not on its experiment)."""
    variant = "".join(f"-{k.removeprefix('psd_')}{v}" for k, v in sorted(cell["variant"].items()))
    noise = "" if cell["noise"] is None else f"-nu{cell['noise']:g}"
    size = "" if cell["n_train"] is None else f"-n{cell['n_train']}"
    return f"{cell['dataset']}-{cell['setting']}{noise}{size}-{cell['method']}{variant}-seed{cell['seed']}"


def expand(preset: dict, seeds: Sequence[int] = SEEDS) -> list[dict]:
    """Every cell of a preset, seed-major (all seed-0 cells first, so a cut-short study stays balanced).

    Returns:
        Cells `{"id", "experiments": [names], "dataset", "setting", "noise", "n_train", "method",
        "variant", "seed"}`; a cell shared by several experiments appears once.
    """
    cells: dict[str, dict] = {}
    for name, exp in preset["experiments"].items():
        unknown = set(exp["settings"]) - set(SETTINGS)
        if unknown:
            raise ValueError(f"experiment {name!r}: unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
        # Both sources take a noise level; only the synthetic one a size (clip art's splits are fixed).
        synthetic = exp["dataset"] == "synthetic"
        noise = exp.get("noise", [None])
        sizes = exp.get("n_train", [preset["base"]["n_train"]]) if synthetic else [None]
        grid = itertools.product(preset.get("seeds", seeds), exp["settings"], noise, sizes,
                                 exp.get("methods", METHODS), exp.get("variants", [{}]))
        for seed, setting, nu, n_train, method, variant in grid:
            cell = {"dataset": exp["dataset"], "setting": setting, "noise": nu, "n_train": n_train,
                    "method": method, "variant": dict(variant), "seed": seed}
            cell = cells.setdefault(cell_id(cell), {"id": cell_id(cell), "experiments": [], **cell})
            cell["experiments"].append(name)
    return sorted(cells.values(), key=lambda c: c["seed"])


def select(cells: list[dict], filters: Sequence[str]) -> list[dict]:
    """The cells matching every `"field=value"` filter (`experiment=size`, `noise=0.4`, `method=psd`)."""
    def matches(cell: dict, key: str, value: str) -> bool:
        if key == "experiment":
            return value in cell["experiments"]
        if key not in cell:
            raise ValueError(f"unknown filter field {key!r}; use experiment or one of {sorted(cell)}")
        return str(cell[key]) == value

    pairs = [f.split("=", 1) for f in filters]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"filters look like field=value, got {list(filters)}")
    return [c for c in cells if all(matches(c, k, v) for k, v in pairs)]


# ---------------------------------------------------------------- running one cell


def train_config(cell: dict, base: dict, run_dir: Path) -> TrainConfig:
    """The `TrainConfig` of a cell: the preset's shared settings, the cell's data, tower and targets."""
    # A variant's keys are LossConfig fields, or TrainConfig fields (OTTER's init_logit_scale_soft).
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    loss = {k: v for k, v in cell["variant"].items() if k in loss_fields}
    train = {k: v for k, v in cell["variant"].items() if k not in loss_fields}
    data = dict(base.get("data_kwargs", {}).get(cell["dataset"], {}))
    if cell["dataset"] == "synthetic":
        data.update(n_train=cell["n_train"], n_eval=base["n_eval"],
                    p_mismatch=cell["noise"] / 2, p_vague=cell["noise"] / 2)
    elif cell["noise"] is not None:  # clip art: the noise level is the share of mismatched captions
        data["caption_noise"] = cell["noise"]
    shared = {k: v for k, v in base.items() if k in ("lr", "weight_decay")}
    return TrainConfig(dataset=cell["dataset"], data_kwargs=data, model=base["model"],
                       **SETTINGS[cell["setting"]], steps=base["steps"],
                       warmup_steps=base["warmup_steps"], batch_size=base["batch_size"], precision="fp32",
                       seed=cell["seed"], out=str(run_dir), overwrite=True, progress=False,
                       save_every=base["steps"], snapshot_every=base["snapshot_every"],
                       loss=LossConfig(method=cell["method"], **loss), **shared, **train)


def eval_splits(dataset: str) -> tuple[str, ...]:
    """The splits a cell is scored on (the synthetic source also has a shifted test split)."""
    return ("train", "val", "test") + (("shift",) if dataset == "synthetic" else ())


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
    """Train one cell, evaluate it on every split, score its soft targets; returns the result dict.

    The linear probe and every metric use at most `base["n_eval"]` samples per split (the probe's
    C is chosen on val); the checkpoint is deleted afterwards (metrics.jsonl and snapshots stay).
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)  # one core per run: parallel runs (--jobs) do not fight over threads
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random towers have no weights
    # NumPy/scikit-learn's BLAS threads too: on a busy machine a threaded linear probe ran 7x slower.
    with threadpool_limits(1):
        return _run_cell(cell, base, cell_dir)


def _run_cell(cell: dict, base: dict, cell_dir: Path) -> dict:
    """`run_cell`'s work, once the thread limits are set."""
    from pdclip.checkpoint import load_checkpoint
    from pdclip.data import build_dataset
    from pdclip.evaluate import evaluate_model, run_target_quality
    from pdclip.train import fit

    tic, cpu = time.perf_counter(), time.process_time()
    cfg = train_config(cell, base, cell_dir / "run")
    summary = fit(cfg)
    train_s = time.perf_counter() - tic
    model, _ = load_checkpoint(summary["checkpoint"], "cpu")
    kwargs = {"image_size": model.image_size, **cfg.data_kwargs, "augment": False}  # frozen features
    splits = eval_splits(cell["dataset"])
    if cfg.feature_cache:  # the heads on the cached backbone features: the full towers' numbers, cheaper
        from pdclip.features import cached_splits

        encoder, datasets = cached_splits(model, cfg.dataset, splits, kwargs, cfg.feature_cache_dir)
    else:
        encoder, datasets = model, {s: build_dataset(cfg.dataset, s, **kwargs) for s in splits}
    scores = evaluate_model(encoder, datasets, max_samples=base["n_eval"])
    quality = (run_target_quality(cfg.out, datasets["train"], cfg.loss.mix_alpha)
               if hasattr(datasets["train"], "true_correspondence") else [])
    Path(summary["checkpoint"]).unlink()  # ~40 MB each; the results are all in result.json
    return {"cell": cell, "metrics": scores, "target_quality": quality,
            "train_s": train_s, "wall_s": time.perf_counter() - tic, "cpu_s": time.process_time() - cpu}


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


def check_base(out: Path, base: dict) -> None:
    """Record the shared settings in `<out>/base.json`; refuse to mix results made with other ones
    (cell ids name only what varies, so stale cells would otherwise be skipped as done)."""
    path = out / "base.json"
    if path.exists() and json.loads(path.read_text()) != base:
        raise ValueError(f"{out} holds results made with other shared settings ({path}); "
                         f"use a new --out or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base, indent=1))


def load_results(out: str | Path, cells: list[dict] | None = None) -> list[dict]:
    """The results under `<out>/cells` (only those of `cells` when given, in their order).

    With `cells`, each result is filed under the cell's experiments as the preset defines them now: an
    experiment added later (an ablation whose default arm was run by another experiment) includes it.
    """
    if cells is None:
        return [json.loads(p.read_text()) for p in sorted(Path(out, "cells").glob("*/result.json"))]
    rows = []
    for cell in cells:
        path = Path(out, "cells", cell["id"], "result.json")
        if path.exists():
            row = json.loads(path.read_text())
            row["cell"]["experiments"] = cell["experiments"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------- aggregation


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean and the half-width of its two-sided t-distribution confidence interval.

    Returns:
        `(mean, half_width, n)`; the half-width is NaN for fewer than two finite values.
    """
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = t.ppf(0.5 + confidence / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def group_key(cell: dict) -> tuple:
    """What identifies a cell up to its seed (and its method)."""
    return (cell["dataset"], cell["setting"], cell["noise"], cell["n_train"],
            json.dumps(cell["variant"], sort_keys=True))


def aggregate(rows: list[dict], value: Callable[[dict], float | None]) -> dict[tuple, dict[str, tuple]]:
    """`{group_key: {method: mean_ci over seeds of value(row)}}` for result rows."""
    groups: dict[tuple, dict[str, list]] = {}
    for row in rows:
        groups.setdefault(group_key(row["cell"]), {}).setdefault(row["cell"]["method"], []).append(value(row))
    return {g: {m: mean_ci(v) for m, v in by_method.items()} for g, by_method in groups.items()}


def _arm(cell: dict, by: str) -> str:
    """What a comparison varies: the method, or (ablations) the variant."""
    return cell["method"] if by == "method" else json.dumps(cell["variant"], sort_keys=True)


def paired_gains(rows: list[dict], value: Callable[[dict], float | None],
                 by: str = "method") -> dict[tuple, dict[str, tuple]]:
    """`{group_key: {arm: mean_ci over seeds of value(arm) - value(baseline arm)}}`, paired by seed.

    Runs with the same seed share their initialisation and batch order, so the paired difference
    removes most of the seed-to-seed variance of the comparison.

    Args:
        by: "method" (arms are methods, the baseline CLIP) or "variant" (arms are variants of
            one method, the baseline its default `{}`; groups then ignore the variant).
    """
    baseline = "clip" if by == "method" else "{}"
    group = group_key if by == "method" else (lambda c: group_key({**c, "variant": {}}))
    by_seed = {(group(r["cell"]), _arm(r["cell"], by), r["cell"]["seed"]): value(r) for r in rows}
    out: dict[tuple, dict[str, list]] = {}
    for (g, arm, seed), v in by_seed.items():
        base = by_seed.get((g, baseline, seed))
        if arm != baseline and base is not None and v is not None:
            out.setdefault(g, {}).setdefault(arm, []).append(v - base)
    return {g: {a: mean_ci(d) for a, d in by_arm.items()} for g, by_arm in out.items()}


def run_effective_robustness(rows: list[dict], key: str = HEADLINE, baseline: str = "clip") -> dict[str, float]:
    """Each run's effective robustness (shift vs test `key`) against the trend of the baseline runs.

    Returns:
        `{cell id: shifted accuracy minus the baseline trend's prediction}`; empty when the rows have
        no shift split or fewer than two distinct baseline accuracies.
    """
    from pdclip.evaluate import robustness_table

    rows = [r for r in rows if f"shift/{key}" in r["metrics"]]
    results = {r["cell"]["id"]: r["metrics"] for r in rows}
    baselines = [r["cell"]["id"] for r in rows if r["cell"]["method"] == baseline]
    if len({results[b][f"test/{key}"] for b in baselines}) < 2:
        return {}
    return robustness_table(results, baselines, key)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the reproduction study (resumable) and write its report.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", default=None, help="the study folder (default: runs/study-<preset>)")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs, one thread each")
    p.add_argument("--results", default=None, help="write the markdown report here (e.g. docs/results.md)")
    p.add_argument("--figures", default="docs/figures", help="where the report's PNG figures go")
    p.add_argument("--report-only", action="store_true", help="skip training; report what is done")
    p.add_argument("--only", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="run only matching cells, e.g. --only experiment=noise noise=0.4 (the report covers all)")
    args = p.parse_args(argv)
    preset, out = PRESETS[args.preset], Path(args.out or f"runs/study-{args.preset}")
    if not args.report_only:
        run_grid(select(expand(preset), args.only), preset["base"], out, jobs=args.jobs)
    if args.results:
        from pdclip.study_report import write_report  # matplotlib only when a report is asked for

        write_report(args.preset, out, Path(args.results), Path(args.figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
