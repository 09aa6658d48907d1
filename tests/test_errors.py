"""Bad inputs give one line naming the file or option and the fix: `error: ...` and exit status 2 from
the CLI, a named exception from the library; never a raw traceback from torch or CUDA."""

import json

import numpy as np
import pytest
import torch
from test_cli import tiny

from pdclip.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from pdclip.features import FeatureCacheError, cached_array, extract
from pdclip.train import fit, main

FAST = ["--steps=2", "--batch-size=8", "--snapshot-every=0", "--progress=false", "--precision=fp32",
        '--data-kwargs={"n_train": 16, "n_eval": 16}']


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, check it failed the way argparse does, and return its one line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err)
    return err[-1]


class NotATensor:
    pass


def test_refused_pickle_says_not_a_pdclip_checkpoint(tmp_path, capsys):
    path = tmp_path / "foreign.pt"
    torch.save({"model": NotATensor()}, path)  # what a non-pdclip script may have written
    line = cli_error(capsys, f"--resume={path}", f"--out={tmp_path / 'run'}", *FAST)
    assert str(path) in line and "not a pdclip checkpoint" in line and "python -m pdclip.train wrote" in line
    assert "weights_only" not in line
    with pytest.raises(CheckpointError) as raised:  # the library's error: no chained torch advice either
        read_checkpoint(path)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_empty_checkpoint_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_000002.pt").touch()  # a copy cut short, a full disk
    line = cli_error(capsys, "--resume=latest", f"--out={run}", *FAST)
    assert line == (f"error: {run / 'checkpoint_000002.pt'} is empty (0 bytes), not a checkpoint: delete it, "
                    "or resume from an older one with --resume PATH")


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "checkpoint_000002.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"checkpoint_000002.pt is truncated or corrupt \(PytorchStreamReader"):
        read_checkpoint(path)


def test_resume_latest_without_a_checkpoint(tmp_path, capsys):
    line = cli_error(capsys, "--resume=latest", f"--out={tmp_path / 'empty'}", *FAST)
    assert "--resume latest: no checkpoint" in line and "drop --resume" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_a_cpu(tmp_path, capsys):
    line = cli_error(capsys, f"--out={tmp_path}", "--steps=2", "--precision=fp16")
    assert line.startswith("error: --precision fp16 needs a CUDA GPU") and "--precision fp32" in line


def test_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, f"--out={tmp_path}", "--steps=2", "--device=cuda")
    assert line == "error: --device cuda: torch sees no CUDA GPU here; use --device auto or --device cpu"


def test_shards_without_urls(tmp_path, capsys):
    line = cli_error(capsys, f"--out={tmp_path}", "--dataset=shards")
    assert line.startswith("error: --dataset shards needs the training shards: --train-data '")


def test_a_config_of_another_dataset(tmp_path, capsys):
    line = cli_error(capsys, "--config", "frozen_cpu", "--dataset", "shards", f"--out={tmp_path}")
    assert "--config frozen_cpu sets data_kwargs {'cache_size': 128} for its dataset clipart" in line
    assert "--data-kwargs" in line


def test_a_write_cut_short_is_removed_with_a_note(tmp_path):
    run = tmp_path / "run"
    fit(tiny(tmp_path, steps=2))
    for name in ("checkpoint_000004.pt.tmp", "checkpoint.pt.tmp"):  # a kill mid-save leaves these
        (run / name).write_bytes(b"half a checkpoint")
    assert latest_checkpoint(run).name == "checkpoint_000002.pt"  # never mistaken for a checkpoint
    fit(tiny(tmp_path, steps=2, resume="latest"))  # nothing left to train: only the start-up runs
    assert not list(run.glob("*.tmp"))
    assert f"removed {run / 'checkpoint.pt.tmp'}: a write cut short" in (run / "train.log").read_text()


def test_feature_file_swapped_for_a_same_shape_one_is_refused(tmp_path):
    def store(name, seed):
        rows = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
        return cached_array(tmp_path, name, {"shard": name}, 6, iter([rows]), "img", quiet=True)

    a, b = store("a", 0), store("b", 1)
    assert not np.array_equal(a, b)
    (path_a,), (path_b,) = tmp_path.glob("a-*.npy"), tmp_path.glob("b-*.npy")
    path_b.write_bytes(path_a.read_bytes())  # same shape, same dtype: only the content tells
    with pytest.raises(FeatureCacheError, match=rf"{path_b}.*sha256 differs.*delete {path_b}"):
        store("b", 1)


def test_feature_file_from_before_hashes_gets_one(tmp_path):
    rows = torch.randn(3, 2)
    cached_array(tmp_path, "old", {"k": 1}, 3, iter([rows]), "img", quiet=True)
    (meta,) = tmp_path.glob("old-*.json")
    stored = json.loads(meta.read_text())
    digest = stored.pop("sha256")
    meta.write_text(json.dumps(stored))  # as written by pdclip before content hashes
    np.testing.assert_array_equal(cached_array(tmp_path, "old", {"k": 1}, 3, iter([]), "img"), rows.numpy())
    assert json.loads(meta.read_text())["sha256"] == digest


def test_corrupt_shard_index_names_its_file(tmp_path, monkeypatch):
    shard = tmp_path / "shard-0000.tar"
    shard.write_bytes(b"stands in for a tar")
    backbone = torch.nn.Linear(2, 3)
    monkeypatch.setattr(extract, "_extract_shard",
                        lambda *a, **k: (np.ones((2, 3), np.float32), ["a cat", "a dog"], [None, None]))
    source = type("Source", (), {"urls": [str(shard)], "subset": None})()
    extract.shard_features(source, backbone, 32, tmp_path / "cache", torch.device("cpu"))
    (index,) = (tmp_path / "cache").glob("*.index.json")
    index.write_text('{"key": {"shard": ')  # a write cut short by hand, a disk error
    with pytest.raises(FeatureCacheError, match=rf"{index} is corrupt .*delete it"):
        extract.shard_features(source, backbone, 32, tmp_path / "cache", torch.device("cpu"))
