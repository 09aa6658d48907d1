"""Binder's set-up: postBuild warms the feature caches the notebooks read."""

import importlib.util
from pathlib import Path

from pdclip.config import load_config
from pdclip.features import CachedFeatures
from pdclip.models import model_from_config

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("warm_feature_cache", ROOT / "binder" / "warm_feature_cache.py")
warm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(warm)


def test_post_build_warms_the_feature_caches():
    assert "python binder/warm_feature_cache.py" in (ROOT / "binder" / "postBuild").read_text()


def test_plan_reads_the_notebooks_parameters():
    reads = warm.plan(list(warm.READS))
    datasets = {dataset: splits for (dataset, _), splits in reads.items()}
    assert datasets["clipart"] == {"train", "test"}
    assert datasets["synthetic"] == {"train", "val", "test", "shift"}  # 07's and 08's keywords are the same
    assert len(reads) == 2


def test_warmed_cache_is_what_a_notebook_then_reads(tmp_path, capsys):
    data = '{"n_train": 24, "n_eval": 8}'
    warm.main(["--only", "07", "--data", data, "--root", str(tmp_path)])
    assert "feature cache miss" in capsys.readouterr().out
    model = model_from_config(load_config("frozen_cpu"))
    CachedFeatures(model, "synthetic", "train", {"n_train": 24, "n_eval": 8}, root=tmp_path)
    out = capsys.readouterr().out
    assert "feature cache: reading" in out and "miss" not in out
