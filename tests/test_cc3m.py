"""pdclip.data.cc3m: CC3M's shard names per route, a check that says how to get what is missing, and a
download step called only when something is missing (the downloads themselves need the internet)."""

import pytest

from pdclip.data import build_dataset, cc3m
from pdclip.data.shard_writer import write_shards


def test_shard_names_of_both_routes():
    assert cc3m.cc3m_urls("d", 8) == ("d/cc3m-train-{0000..0007}.tar", "d/cc3m-validation-0000.tar")
    assert cc3m.cc3m_urls("d", 2, "img2dataset") == ("d/train/{00000..00001}.tar", "d/validation/00000.tar")
    with pytest.raises(ValueError, match="route"):
        cc3m.cc3m_urls("d", 2, "torrent")


def test_missing_shards_say_how_to_get_them(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="python -m pdclip.data.cc3m --data-dir"):
        cc3m.get_cc3m(tmp_path, 2)
    with pytest.raises(SystemExit) as stop:
        cc3m.main(["--data-dir", str(tmp_path), "--shards", "2", "--check"])
    assert stop.value.code == 1 and "3 of 3 shards missing" in capsys.readouterr().err


def test_the_download_runs_only_for_what_is_missing(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_hf(data_dir, n_shards):  # real shards under CC3M's names, as pixparse/cc3m-wds holds them
        calls.append(n_shards)
        written = write_shards(build_dataset("synthetic", "val", n_eval=8, seed=0), tmp_path / "w", 4)
        for path, name in zip(written, ("cc3m-train-0000.tar", "cc3m-validation-0000.tar"), strict=True):
            path.replace(data_dir / name)

    monkeypatch.setitem(cc3m.DOWNLOADERS, "hf", fake_hf)
    train, heldout = cc3m.get_cc3m(tmp_path, 1, download="hf")
    assert calls == [1] and [p.split("/")[-1] for p in train + heldout] == ["cc3m-train-0000.tar",
                                                                            "cc3m-validation-0000.tar"]
    cc3m.main(["--data-dir", str(tmp_path), "--shards", "1"])  # complete already: no second download
    assert calls == [1] and "1 training shards and 1 held-out shard(s) complete" in capsys.readouterr().out
