"""The study machinery without training: CI math, grid expansion, resuming, gains, the report and the CLI;
and no import cycle anywhere in pdclip."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdclip.config import METHODS
from pdclip.study import presets, report, results, runner, stats

ROOT = Path(__file__).resolve().parent.parent


def test_mean_ci_matches_hand_computed_t_interval():
    # mean 2, sample sd 1, t_{0.975, df=2} = 4.302653 -> half-width 4.302653 / sqrt(3)
    mean, half, n = stats.mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    # df=4: t = 2.776445; values 10, 12, 14, 16, 18 -> sd sqrt(10)
    assert stats.mean_ci([10, 12, 14, 16, 18])[1] == pytest.approx(2.776445 * math.sqrt(10) / math.sqrt(5), rel=1e-6)


def test_mean_ci_drops_missing_values_and_has_no_width_below_two_seeds():
    mean, half, n = stats.mean_ci([4.0, None, float("nan")])
    assert (mean, n) == (4.0, 1) and math.isnan(half)
    assert stats.mean_ci([])[2] == 0


def test_quick_grid_is_noise_by_method_by_seed_seed_major():
    cells = presets.expand(presets.PRESETS["quick"])
    assert len(cells) == 2 * 5 * 3 == len({c["id"] for c in cells})
    assert [c["seed"] for c in cells] == sorted(c["seed"] for c in cells)
    assert {c["method"] for c in cells} == set(METHODS)


def test_full_grid_runs_shared_cells_once():
    cells = presets.expand(presets.PRESETS["full"])
    # noise 75 + size 2 new sizes x 15 + pretrained 15 + clip art 15 + (6 + teachers) new PSD variants x 3
    # + 1 new OTTER variant x 2 settings x 3
    psd_variants = 3 * (6 + len(presets.PSD_TEACHER_VARIANTS))
    assert len(cells) == 75 + 30 + 15 + 15 + psd_variants + 6 == len({c["id"] for c in cells})
    assert presets.PSD_REWEIGHTED_CLIP in [c["variant"] for c in cells]  # the degenerate control
    shared = next(c for c in cells if c["id"] == "synthetic-scratch-nu0.4-n2000-psd-seed0")
    assert shared["experiments"] == ["noise", "size", "pretrained", "psd_ablation"]
    assert all(c["noise"] is None for c in cells if c["dataset"] == "clipart")


def test_a_variant_sets_loss_or_training_fields(tmp_path):
    cells = presets.select(presets.expand(presets.PRESETS["full"]), ["experiment=otter_ablation", "setting=pretrained"])
    variant = next(c for c in cells if c["variant"])
    cfg = runner.train_config(variant, presets.PRESETS["full"]["base"], tmp_path)
    assert cfg.init_logit_scale_soft == pytest.approx(math.log(1 / 0.07), abs=1e-4)
    assert (cfg.loss.method, cfg.pretrained_text) == ("otter", "all-MiniLM-L6-v2")
    psd = next(c for c in presets.expand(presets.PRESETS["full"]) if c["variant"] == {"psd_subset": 1.0})
    cfg = runner.train_config(psd, presets.PRESETS["full"]["base"], tmp_path)
    assert (cfg.loss.psd_subset, cfg.init_logit_scale_soft) == (1.0, 3.9)


def test_expand_rejects_an_unknown_setting():
    preset = {"base": {"n_train": 10}, "experiments": {"x": {"dataset": "synthetic", "settings": ["frozen-typo"]}}}
    with pytest.raises(ValueError, match="unknown settings"):
        presets.expand(preset)


def _row(cell: dict, metrics: dict, samples: dict | None = None, **extra) -> dict:
    """A result row as `runner.run_cell` writes it, with one evaluation: the last step's."""
    return {"cell": cell, "budgets": {"final": {"step": 100, "metrics": metrics, "samples": samples or {}}},
            "probe_budget": "final", "curve": [], "target_quality": [], "train_s": 1.0, "wall_s": 1.0, **extra}


def _fake_run(calls: list):
    def run(cell, base, cell_dir):
        calls.append(cell["id"])
        acc = 0.1 * (1 + METHODS.index(cell["method"])) + 0.01 * cell["seed"]
        return _row(cell, {f"test/{presets.HEADLINE}": acc})
    return run


def test_run_grid_resumes_only_the_missing_cells(tmp_path):
    cells = presets.expand(presets.PRESETS["quick"], seeds=[0, 1])
    base, calls = presets.PRESETS["quick"]["base"], []
    rows = runner.run_grid(cells, base, tmp_path, run_fn=_fake_run(calls), log=lambda _: None)
    assert len(calls) == len(rows) == len(cells)
    (tmp_path / "cells" / cells[3]["id"] / "result.json").unlink()  # as if interrupted there
    calls.clear()
    rows = runner.run_grid(cells, base, tmp_path, run_fn=_fake_run(calls), log=lambda _: None)
    assert calls == [cells[3]["id"]]
    assert [r["cell"]["id"] for r in rows] == [c["id"] for c in cells]
    with pytest.raises(ValueError, match="other shared settings"):
        runner.run_grid(cells, {**base, "steps": 1}, tmp_path, run_fn=_fake_run(calls), log=lambda _: None)


def test_results_are_filed_under_experiments_added_later(tmp_path):
    before = {"base": {"n_train": 10}, "experiments": {"x": {"dataset": "synthetic", "settings": ["scratch"]}}}
    cells = presets.expand(before, seeds=[0])
    runner.run_grid(cells, before["base"], tmp_path, run_fn=_fake_run([]), log=lambda _: None)
    after = {**before, "experiments": {**before["experiments"],
                                       "y": {"dataset": "synthetic", "settings": ["scratch"], "methods": ["otter"]}}}
    rows = results.load_results(tmp_path, presets.expand(after, seeds=[0]))
    assert [r["cell"]["method"] for r in rows if "y" in r["cell"]["experiments"]] == ["otter"]


def test_paired_gains_difference_by_seed(tmp_path):
    cells = presets.expand(presets.PRESETS["quick"], seeds=[0, 1, 2])
    rows = runner.run_grid(cells, presets.PRESETS["quick"]["base"], tmp_path, run_fn=_fake_run([]), log=lambda _: None)
    value = lambda r: results.scores(r)[f"test/{presets.HEADLINE}"]  # noqa: E731
    gains = stats.paired_gains(rows, value)
    group = next(iter(gains))
    mean, half, n = gains[group]["otter"]  # otter is 0.4 above clip at every seed: no spread
    assert (n, "clip" in gains[group]) == (3, False)
    assert mean == pytest.approx(0.4) and half == pytest.approx(0.0, abs=1e-9)
    assert stats.aggregate(rows, value)[group]["clip"][0] == pytest.approx(0.11)


def _test_samples(acc: float, n: int = 50) -> dict:
    """Per-image test outcomes whose scores are `acc` (the first round(acc * n) images right)."""
    right = [int(i < round(acc * n)) for i in range(n)]
    return {"test": {"zeroshot/colour_shape/pred": [0 if r else 1 for r in right], "zeroshot/colour_shape/label": [0] * n,
                     "retrieval/i2t_hit@1": right, "retrieval/t2i_hit@1": right, "retrieval/text_to_image": list(range(n))},
            "linear_probe": {"pred": [0 if r else 1 for r in right], "label": [0] * n}}


def _fake_eval_run(cell, base, cell_dir):
    acc = 0.2 + 0.04 * METHODS.index(cell["method"]) + 0.02 * cell["seed"] - 0.1 * cell["noise"]
    keys = [f"{s}/{presets.HEADLINE}" for s in ("val", "test")] + [f"test/{presets.HEADLINE.replace('top1', 'hit@1')}",
            "test/retrieval/i2t_R@1", "test/retrieval/t2i_R@1", "linear_probe/acc"]
    metrics = ({k: acc for k in keys} | {f"shift_mild/{presets.HEADLINE}": acc * 0.8}
               | {f"chance/{k}": 0.01 for k in keys} | {f"chance/shift_mild/{presets.HEADLINE}": 0.01})
    quality = [{"step": s, "i2t/true_mass": 0.9, "i2t/offdiag_precision": 0.3, "i2t/chance_offdiag_precision": 0.1,
                "i2t/chance_true_mass": 0.05} for s in (0, 10)]
    return _row(cell, metrics, _test_samples(acc), target_quality=quality, wall_s=2.0)


def test_write_report_fills_its_block_and_keeps_the_text_around_it(tmp_path):
    preset = presets.PRESETS["quick"]
    runner.run_grid(presets.expand(preset), preset["base"], tmp_path / "runs", run_fn=_fake_eval_run, log=lambda _: None)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\nhand-written intro\n<!-- study:quick:begin -->\nstale\n<!-- study:quick:end -->\noutro\n")
    report.write_report("quick", tmp_path / "runs", doc, tmp_path / "figures")
    text = doc.read_text()
    assert text.startswith("# Results\nhand-written intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "30 of 30 runs finished" in text and "| synthetic, scratch, ν=0.8, n=2000 | otter | 3 |" in text
    # otter is 16 points (8 of 50 images) above clip at every seed: the bootstrap over images and seeds
    # still calls it, after Holm over the table's 2 noise levels x 4 methods x 4 columns
    assert "otter helps ZS at synthetic, scratch, ν=0, n=2000 (+16.0 [+7.3, +26.0] points, Holm p = " in text
    assert "| synthetic, scratch, ν=0, n=2000 | otter | **+16.0 [+7.3, +26.0]** |" in text  # the verdict, in bold
    assert "Verdicts (" in text and " of 32 comparisons, Holm-corrected)" in text
    assert "| synthetic, scratch, ν=0.8, n=2000 | *chance* | | 1.0 |" in text  # next to every condition
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        "quick_accuracy_vs_noise.png", "quick_gain_vs_noise.png", "quick_effective_robustness.png",
        "quick_target_quality.png"}


def test_run_grid_in_parallel_processes_writes_every_result(tmp_path):
    cells = presets.expand(presets.PRESETS["quick"], seeds=[0])[:4]
    rows = runner.run_grid(cells, presets.PRESETS["quick"]["base"], tmp_path, run_fn=_fake_eval_run, jobs=2,
                             log=lambda _: None)
    assert [r["cell"]["id"] for r in rows] == [c["id"] for c in cells]


def test_select_filters_cells_by_field_and_experiment():
    cells = presets.expand(presets.PRESETS["full"])
    chosen = presets.select(cells, ["experiment=size", "noise=0.4", "method=psd"])
    assert len(chosen) == 3 * 3 and {c["n_train"] for c in chosen} == {2000, 4000, 8000}
    with pytest.raises(ValueError, match="unknown filter field"):
        presets.select(cells, ["colour=red"])


def test_paired_gains_by_variant_compare_ablations_with_the_default(tmp_path):
    preset = {"base": {"n_train": 10}, "experiments": {"abl": {
        "dataset": "synthetic", "settings": ["scratch"], "noise": [0.4], "methods": ["psd"],
        "variants": [{}, {"psd_subset": 1.0}]}}}
    def run(cell, base, cell_dir):
        acc = 0.3 + (0.05 if cell["variant"] else 0.0) + 0.01 * cell["seed"]
        return _row(cell, {"x": acc})
    rows = runner.run_grid(presets.expand(preset), preset["base"], tmp_path, run_fn=run, log=lambda _: None)
    (gains,) = stats.paired_gains(rows, lambda r: results.scores(r)["x"], by="variant").values()
    assert list(gains) == ['{"psd_subset": 1.0}'] and gains['{"psd_subset": 1.0}'][0] == pytest.approx(0.05)


def test_frozen_preset_trains_heads_on_cached_features_with_five_seeds(tmp_path):
    """The main comparison's regime: the shipped frozen_cpu towers, clip-art noise as caption noise."""
    cells = presets.expand(presets.PRESETS["frozen"])
    assert {c["seed"] for c in cells} == {0, 1, 2, 3, 4}
    clipart = next(c for c in cells if c["dataset"] == "clipart" and c["noise"] == 0.4 and c["method"] == "clip")
    cfg = runner.train_config(clipart, presets.PRESETS["frozen"]["base"], tmp_path)
    assert cfg.feature_cache and cfg.freeze_image and cfg.freeze_text and cfg.pretrained_image == "efficientnet_lite0"
    assert cfg.data_kwargs == {"cache_size": 128, "caption_noise": 0.4} and cfg.batch_size == 128
    synthetic = next(c for c in cells if c["dataset"] == "synthetic" and c["noise"] == 0.6)
    assert runner.train_config(synthetic, presets.PRESETS["frozen"]["base"], tmp_path).data_kwargs["p_vague"] == 0.3


def test_feature_caches_are_built_once_per_dataset_before_the_cells_run(tmp_path, monkeypatch):
    """Parallel cells must not extract the same cache side by side: `run_grid` builds each dataset's
    caches first, once, and a second call finds them all."""
    monkeypatch.setattr("pdclip.features.dataset.DEFAULT_ROOT", tmp_path / "cache")  # where CachedFeatures reads it
    base = {**presets.PRESETS["frozen"]["base"], "n_train": 16, "n_eval": 8}
    preset = {"base": base, "experiments": {"x": {"dataset": "synthetic", "settings": ["frozen"], "noise": [0.0],
                                                  "methods": ["clip", "psd"]}}}
    cells = presets.expand(preset, seeds=(0, 1))
    logged: list[str] = []
    runner.build_feature_caches(cells, base, logged.append)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")}
    assert len(logged) == 1  # four cells, one dataset
    assert len(files) == 10  # train, val, test, shift, shift_mild: images and captions each
    runner.build_feature_caches(cells, base, logged.append)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")} == files  # read, not rewritten


def test_the_cli_runs_as_a_module_and_reports_nothing_without_results(tmp_path):
    """`python -m pdclip.study` as the Makefile calls it (from the checkout's root): its help, and
    `--report-only` on an empty folder, which trains nothing and writes nothing."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pdclip.study", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})

    shown = run("--help")
    assert shown.returncode == 0, shown.stderr
    assert "--preset {frozen,full,multipositive,partial,quick}" in shown.stdout and "--report-only" in shown.stdout
    done = run("--preset", "quick", "--report-only", "--out", str(tmp_path / "empty"))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "empty").exists()


def test_a_data_variant_compared_across_methods_gets_a_per_method_table(tmp_path, monkeypatch):
    """The caption ablation: a dataset keyword as the variant, every method in both arms; the report
    compares methods within each arm and each method across the arms."""
    preset = {"about": "x", "base": {**presets.PRESETS["quick"]["base"], "n_train": 10}, "seeds": (0, 1),
              "experiments": {"captions": {"dataset": "synthetic", "settings": ["scratch"], "noise": [0.4],
                                           "methods": ["clip", "otter"], "variants": [{}, {"relations": False}],
                                           "compare": "method"}}}
    cell = next(c for c in presets.expand(preset) if c["variant"])
    assert runner.train_config(cell, preset["base"], tmp_path).data_kwargs["relations"] is False  # a data keyword
    monkeypatch.setitem(presets.PRESETS, "captions", preset)
    runner.run_grid(presets.expand(preset), preset["base"], tmp_path / "runs", run_fn=_fake_eval_run, log=lambda _: None)
    report.write_report("captions", tmp_path / "runs", tmp_path / "results.md", tmp_path / "figures")
    text = (tmp_path / "results.md").read_text()
    assert "What the variant changes, per method" in text
    assert '| synthetic, scratch, ν=0.4, n=10 | clip: {"relations": false} |' in text
    assert '| synthetic, scratch, ν=0.4, n=10, relations=False | otter |' in text  # methods within an arm


def test_partial_preset_trains_last_blocks_on_cached_trunks_and_shares_cells(tmp_path):
    """Issue 27's regime: PSD against CLIP and PSD's dose x teacher per regime, on the same cells."""
    preset = presets.PRESETS["partial"]
    cells = presets.expand(preset)
    assert len(cells) == 60 and {c["seed"] for c in cells} == {0, 1, 2, 3, 4}
    default_psd = next(c for c in cells if c["dataset"] == "clipart" and c["method"] == "psd" and not c["variant"])
    assert default_psd["experiments"] == ["partial_clipart", "partial_clipart_psd"]
    cfg = runner.train_config(default_psd, preset["base"], tmp_path)
    assert cfg.feature_cache and cfg.freeze_image and cfg.freeze_text
    assert (cfg.trainable_blocks, cfg.trainable_text_layers) == (2, 1)
    low_epoch = next(c for c in cells if c["dataset"] == "synthetic")
    assert preset["base"]["steps"] * preset["base"]["batch_size"] < low_epoch["n_train"]  # under one epoch
    short = next(c for c in cells if "partial_clipart_two_epochs" in c["experiments"])
    short_cfg = runner.train_config(short, preset["base"], tmp_path)  # a variant may shorten the run
    assert short_cfg.steps == short_cfg.save_every == 98 and short_cfg.data_kwargs["caption_noise"] == 0.6
    assert short_cfg.steps * short_cfg.batch_size <= 2 * 6295  # at most two epochs of clip art's training split


def test_train_curve_is_window_means_and_the_report_tables_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "train_confidence": {s / 100}, "alpha": 0.5}}\n' for s in range(1, 61)))
    curve = runner.train_curve(metrics, points=30)
    assert len(curve) == 30 and curve[0] == {"step": 2, "train_confidence": pytest.approx(0.015), "alpha": 0.5}
    preset = presets.PRESETS["partial"]

    def run(cell, base, cell_dir):
        row = _fake_eval_run({**cell, "noise": 0.4}, base, cell_dir)
        if cell["dataset"] == "clipart":  # its headline: balanced accuracy on the category task
            row = json.loads(json.dumps(row).replace(presets.HEADLINE, "zeroshot/category/mean_per_class_recall")
                             .replace("zeroshot/colour_shape/", "zeroshot/category/"))
        row["cell"] = cell
        offdiag = {"target_offdiag": 0.25} if cell["method"] == "psd" else {}
        row["train_curve"] = [{"step": s, "train_confidence": s / 200, **offdiag} for s in (50, 100, 150)]
        return row

    runner.run_grid(presets.expand(preset, seeds=[0, 1]), preset["base"], tmp_path / "runs", run_fn=run, log=lambda _: None)
    doc = tmp_path / "results.md"
    report.write_report("partial", tmp_path / "runs", doc, tmp_path / "figures")
    text = doc.read_text()
    assert "| condition | method | confidence @ 33% | confidence @ 67% | confidence @ 100% | off-diagonal mass @ 33%" in text
    assert "| clipart, partial, ν=0.4 | clip | 25.0 ± 0.0 | 50.0 ± 0.0 | 75.0 ± 0.0 | – | – | – |" in text
    assert "| clipart, partial, ν=0.4 | psd | 25.0 ± 0.0 | 50.0 ± 0.0 | 75.0 ± 0.0 | 25.0 ± 0.0 |" in text
    assert "partial_train_curves.png" in {p.name for p in (tmp_path / "figures").iterdir()}
