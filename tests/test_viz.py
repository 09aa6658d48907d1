"""pdclip.viz: every plot returns its axes and saves a PNG (Agg backend, no display)."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pdclip import viz  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def saved(fig, path) -> bool:
    fig.savefig(path)
    return path.stat().st_size > 1000


def test_effective_robustness_plot(tmp_path):
    ax = viz.plot_effective_robustness([0.3, 0.5, 0.7, 0.55], [0.15, 0.3, 0.5, 0.45],
                                       ["clip-a", "clip-b", "clip-c", "psd"], baselines=["clip-a", "clip-b", "clip-c"])
    assert ax.get_xscale() == "logit" and len(ax.lines) == 2  # y = x and the trend line
    assert saved(ax.figure, tmp_path / "er.png")
    with pytest.raises(ValueError, match="one entry per model"):
        viz.plot_effective_robustness([0.3, 0.5], [0.2], ["a", "b"], ["a", "b"])


def test_effective_robustness_plot_draws_chance_inside_its_axes(tmp_path):
    ax = viz.plot_effective_robustness([0.3, 0.5, 0.55], [0.15, 0.3, 0.45], ["a", "b", "c"], baselines=["a", "b"],
                                       chance=0.05)
    assert len(ax.lines) == 4 and ax.get_xlim()[0] < 0.05  # y = x, the trend, chance on x and on y
    assert any("chance" in t.get_text() for t in ax.get_legend().get_texts())
    assert saved(ax.figure, tmp_path / "er_chance.png")


def test_matrices_side_by_side(tmp_path):
    logits = torch.randn(6, 6)
    axes = viz.plot_matrices({"logits": logits, "targets": logits.softmax(1), "truth": torch.eye(6, dtype=torch.bool)})
    assert len(axes) == 3 and axes[2].get_title() == "truth"
    assert saved(axes[0].figure, tmp_path / "mats.png")
    _, mine = plt.subplots(1, 2)
    assert list(viz.plot_matrices({"a": np.eye(3), "b": np.ones((3, 3))}, axes=mine)) == list(mine)
    with pytest.raises(ValueError, match="2 axes for 1"):
        viz.plot_matrices({"a": np.eye(3)}, axes=mine)


def test_training_curves_from_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 4 / (s + 1), "lr": 1e-3} for s in range(10)] + [{"step": 10, "note": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ax = viz.plot_training_curves(path, keys=("loss", "missing"), logy=True)
    assert len(ax.lines) == 1 and len(ax.lines[0].get_xdata()) == 10
    assert saved(ax.figure, tmp_path / "curves.png")
    smoothed = viz.plot_training_curves(rows, keys=("loss",), smooth=3).lines[0].get_ydata()
    np.testing.assert_allclose(smoothed[:3], [4.0, 3.0, (4 + 2 + 4 / 3) / 3])
    with pytest.raises(ValueError, match="no record"):
        viz.plot_training_curves(rows, keys=("accuracy",))


def test_compared_matrices_share_one_colour_scale(tmp_path):
    soft, hard = np.full((4, 4), 0.25), np.eye(4)
    axes = viz.plot_matrices({"soft": soft, "hard": hard}, label="target mass")
    assert [ax.images[0].get_clim() for ax in axes] == [(0.0, 1.0)] * 2  # equal colours, equal values
    assert len(axes[0].figure.axes) == 3  # two panels and one colour bar
    axes = viz.plot_matrices({"soft": soft, "hard": hard}, log=True, vmin=1e-3, vmax=1)
    assert axes[1].images[0].norm.vmin == 1e-3 and saved(axes[0].figure, tmp_path / "log.png")
    axes = viz.plot_matrices({"logits": 10 * hard, "targets": soft}, shared_scale=False)
    assert axes[0].images[0].get_clim() != axes[1].images[0].get_clim() and len(axes[0].figure.axes) == 4
    with pytest.raises(ValueError, match="vmin > 0"):
        viz.plot_matrix(hard, log=True)


def test_robustness_points_are_named_in_a_legend_not_by_overlapping_labels(tmp_path):
    names = ["clip", "clip 60", "psd", "otter", "ls", "kd"]
    id_acc = [0.30, 0.31, 0.305, 0.50, 0.302, 0.60]  # four points in a clump
    shift_acc = [0.20, 0.205, 0.21, 0.35, 0.202, 0.40]
    ax = viz.plot_effective_robustness(id_acc, shift_acc, names, baselines=["clip", "clip 60", "otter"])
    assert not ax.texts  # nothing drawn next to the clumped points
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"clip (baseline)", "clip 60 (baseline)", "psd", "otter (baseline)", "ls", "kd"} <= set(labels)
    assert saved(ax.figure, tmp_path / "legend.png")


def test_training_curves_have_a_y_label():
    rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)]
    assert viz.plot_training_curves(rows, smooth=2).get_ylabel() == "loss (mean of 2)"
    assert viz.plot_training_curves(rows, ylabel="CLIP loss").get_ylabel() == "CLIP loss"


def test_training_curves_of_several_runs_share_one_axes(tmp_path):
    ax = None
    for k, name in enumerate(("CLIP", "PSD", "OTTER")):
        records = [{"step": i, "loss": (k + 1) * 2.0 ** -i} for i in range(10)]
        ax = viz.plot_training_curves(records, ax=ax, label=name, logy=True, legend=name == "OTTER")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["CLIP", "PSD", "OTTER"]
    assert ax.get_yscale() == "log" and len(ax.lines) == 3
    assert saved(ax.figure, tmp_path / "curves.png")


def test_seed_curves_draw_mean_and_range_of_the_seeds():
    runs = [[{"step": s, "acc": a + s / 100} for s in (10, 20, 40)] for a in (0.1, 0.3)]
    ax = viz.plot_seed_curves({"CLIP": runs}, "acc", chance=0.05)
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), [0.3, 0.4, 0.6])  # the mean of the two seeds
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.2) and band.max() == pytest.approx(0.7)  # lowest to highest seed
    assert "CLIP (2 seeds)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_seed_intervals_keep_a_point_near_chance_in_view():
    ax = viz.plot_seed_intervals({"CLIP": [0.30, 0.32, 0.34], "scratch": [0.07]}, chance=0.0625)
    lo, hi = ax.get_ylim()
    assert lo == 0 and hi > 0.34 and ax.get_legend() is None  # no legend box over the low point
    assert ax.containers[0].lines[0].get_ydata()[0] == pytest.approx(0.32)  # CLIP's mean over its seeds
    assert ax.containers[1].lines[0].get_ydata()[0] == pytest.approx(0.07)  # one seed: its value, no interval


def test_robustness_points_of_one_group_share_a_colour_and_one_legend_entry():
    names = ["CLIP s0", "CLIP s1", "OTTER s0", "OTTER s1"]
    ax = viz.plot_effective_robustness([0.5, 0.6, 0.55, 0.65], [0.4, 0.5, 0.42, 0.52], names, names[:2],
                                       groups=["CLIP", "CLIP", "OTTER", "OTTER"])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels.count("CLIP (baseline)") == 1 and labels.count("OTTER") == 1
    colours = [tuple(c.get_facecolor()[0]) for c in ax.collections]
    assert colours[0] == colours[1] and colours[2] == colours[3] and colours[0] != colours[2]
