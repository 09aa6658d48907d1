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
