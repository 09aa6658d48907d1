"""The study's grid: presets, the towers a setting names, and the cells a preset expands to.

A preset is plain data (`PRESETS`): shared training settings plus named experiments, each a product
of methods x settings x noise levels x training-set sizes x variants (LossConfig or TrainConfig
fields) x seeds. `expand` turns it into cells; a cell's id comes from its configuration only, so a
cell shared by two experiments runs once. `select` picks cells by field (the CLI's `--only`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence

from pdclip.config import METHODS, LossConfig, load_config

# PSD's teachers against the default one (`{}`), with the degenerate control: the same forward's
# predictions at T = 1 make PSD a per-row reweighted CLIP (notebook 03); it shows what a teacher adds.
PSD_REWEIGHTED_CLIP = {"psd_teacher": "self", "psd_temperature": 1.0}
PSD_TEACHER_VARIANTS = [PSD_REWEIGHTED_CLIP, {"psd_teacher": "self", "psd_temperature": 2.0},
                        *({"psd_teacher": t} for t in ("ema", "snapshot", "intra") if t != LossConfig.psd_teacher)]
CONTROLS = {json.dumps(PSD_REWEIGHTED_CLIP, sort_keys=True): "control: a reweighted CLIP"}  # report labels
# PSD's dose: the default (rho 0.5, alpha_max 0.5) and a strong one (every row soft, alpha ramped to 0.9).
PSD_DOSES = [{}, {"psd_subset": 1.0, "psd_alpha_max": 0.9}]
# The partial preset's regimes: (name, dataset, noise).
PARTIAL_REGIMES = [("clipart", "clipart", 0.4), ("low_epoch", "synthetic", 0.6)]

# Where the frozen study evaluates: densely early (CLIP's validation zero-shot peaks within the first
# 100 steps on noisy captions), sparsely later.
EVAL_STEPS = [10, 20, 30, 40, 50, 60, 80, 100, 125, 150, 200, 250, 300, 400, 500, 600, 750]

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
        "about": "frozen pretrained towers (EfficientNet-Lite0 + MiniLM, cached features), trained heads, "
                 "each run's budget chosen on validation: synthetic and clip-art noise sweeps, a size sweep, "
                 "a caption ablation, PSD / OTTER ablations, 5 seeds",
        # Up to 750 steps, evaluated at EVAL_STEPS on val (and test, for the curves only): each run is read
        # at its best validation step (pdclip.study.runner.SELECTIONS), and at its last for the fixed budget.
        # n_eval: the synthetic source's val / test / shift splits (clip art's are fixed), all scored whole.
        "base": {"model": "pdclip-vit-tiny", "steps": 750, "warmup_steps": 100, "batch_size": 128, "lr": 1e-3,
                 "weight_decay": 0.1, "n_train": 2000, "n_eval": 1000, "snapshot_every": 125, "eval_steps": EVAL_STEPS,
                 "data_kwargs": {"clipart": {"cache_size": 128}}},
        "seeds": (0, 1, 2, 3, 4),
        "experiments": {
            "noise": {"dataset": "synthetic", "settings": ["frozen"], "noise": [0.0, 0.2, 0.4, 0.6]},
            "clipart_noise": {"dataset": "clipart", "settings": ["frozen"], "noise": [0.0, 0.2, 0.4, 0.6]},
            # The old clip-art captions, which end in their category path: the zero-shot classes' words.
            "clipart_category_captions": {"dataset": "clipart", "settings": ["frozen"], "noise": [0.0, 0.4],
                                          "variants": [{}, {"category_in_caption": True}], "compare": "method"},
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
        },
    },
    # PSD where a self-teacher can disagree with the label (issue 27): the last two Lite0 blocks and
    # MiniLM's last layer train on cached trunks (SETTINGS["partial"]), for 150 steps of 128 pairs: ~3
    # epochs of noisy clip art, and under one epoch of 20,000 noisier synthetic pairs. PSD's dose (the
    # default rho 0.5 / alpha 0.5, or soft rows everywhere ramped to 0.9) crosses its teachers.
    "partial": {
        "about": "partial fine-tuning on cached trunks (Lite0's last 2 blocks, MiniLM's last layer, heads): "
                 "clip art nu 0.4 (~3 epochs) and 20,000 synthetic pairs nu 0.6 (<1 epoch); CLIP against "
                 "PSD's dose x teacher (EMA, previous-epoch snapshot); clip art nu 0.6 in 2 epochs; budgets "
                 "chosen on validation, 5 seeds",
        "base": {"model": "pdclip-vit-tiny", "steps": 150, "warmup_steps": 15, "batch_size": 128, "lr": 1e-3,
                 "weight_decay": 0.1, "n_train": 20000, "n_eval": 1000, "snapshot_every": 50,
                 "eval_steps": [25, 50, 75, 100, 125, 150], "data_kwargs": {"clipart": {"cache_size": 128}}},
        "seeds": (0, 1, 2, 3, 4),
        "experiments": {  # per regime: PSD (default) against CLIP, then PSD's dose x teacher (same cells)
            **{f"partial_{name}": {"dataset": dataset, "settings": ["partial"], "noise": [nu], "methods": ["clip", "psd"]}
               for name, dataset, nu in PARTIAL_REGIMES},
            **{f"partial_{name}_psd": {"dataset": dataset, "settings": ["partial"], "noise": [nu], "methods": ["psd"],
                                       "variants": [{**dose, **teacher} for dose in PSD_DOSES for teacher in
                                                    ({}, {"psd_teacher": "snapshot"})]}
               for name, dataset, nu in PARTIAL_REGIMES},
            # Clip art with more injected noise and under two epochs (98 x 128 of its 6,295 pairs).
            "partial_clipart_two_epochs": {"dataset": "clipart", "settings": ["partial"], "noise": [0.6],
                                           "methods": ["clip", "psd"], "variants": [{"steps": 98}],
                                           "compare": "method"},
        },
    },
    # Identical captions as positives (docs/methods.md §8), for CLIP and for a soft-target method: a no-op
    # with frozen deterministic text towers (tested), measured under the earlier fixed-budget protocol.
    "multipositive": {
        "about": "multi-positive targets on and off, CLIP and OTTER, frozen towers, 750 steps, 5 seeds",
        "base": {"model": "pdclip-vit-tiny", "steps": 750, "warmup_steps": 100, "batch_size": 128, "lr": 1e-3,
                 "weight_decay": 0.1, "n_train": 2000, "n_eval": 1000, "snapshot_every": 125,
                 "data_kwargs": {"clipart": {"cache_size": 128}}},
        "seeds": (0, 1, 2, 3, 4),
        "experiments": {f"multi_positive_{m}": {"dataset": "synthetic", "settings": ["frozen"],
                                                "noise": [0.0, 0.2, 0.4, 0.6], "methods": [m],
                                                "variants": [{}, {"multi_positive": True}]}
                        for m in ("clip", "otter")},
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
# The frozen towers but their last blocks / layer, trained at pretrained_lr_scale on cached trunks.
SETTINGS["partial"] = {**SETTINGS["frozen"], "trainable_blocks": 2, "trainable_text_layers": 1}
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
