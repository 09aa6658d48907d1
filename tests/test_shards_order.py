"""Shard data order on img2dataset-layout shards the tests write (9-digit keys, .jpg/.png/.txt/.json,
grayscale, CMYK and RGBA images, a .parquet and _stats.json beside each tar): seeds, reshuffling,
readers (ranks x workers), subset, fail-fast errors, the HF route, held-out data, exact resume."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from pdclip import evaluate
from pdclip.checkpoint import read_checkpoint
from pdclip.config import TrainConfig
from pdclip.data import build_dataset, split_kwargs
from pdclip.data.sampling import GlobalBatchSampler, ShardBatches, make_batches, mixed_seed
from pdclip.features.extract import _extract_shard
from pdclip.train import default_eval_fn, fit

PER_SHARD, PX = 12, 16
MODES = ("RGB", "L", "CMYK", "RGBA")  # RGB and grayscale / CMYK JPEGs, PNGs with alpha


def image_bytes(n: int) -> tuple[str, bytes]:
    mode = MODES[n % 4]
    rng = np.random.default_rng(n)
    channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (PX, PX, channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    ext = "png" if mode == "RGBA" else "jpg"
    Image.fromarray(pixels, mode).save(buf, format="PNG" if ext == "png" else "JPEG")
    return ext, buf.getvalue()


def write_img2dataset(folder: Path, shards: int, first: int = 0) -> list[str]:
    """`{00000..}.tar` as img2dataset writes them: key `{shard:05d}{i:04d}`, caption "pair <key>"."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(first, first + shards):
        path, rows = folder / f"{shard:05d}.tar", []
        with tarfile.open(path, "w") as tar:
            for i in range(PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                ext, data = image_bytes(shard * PER_SHARD + i)
                meta = {"url": f"http://x/{key}.{ext}", "caption": f"pair {key}", "key": key, "status": "success",
                        "width": PX, "height": PX}
                for name, blob in ((f"{key}.{ext}", data), (f"{key}.txt", meta["caption"].encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD, "successes": PER_SHARD}))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2dataset")
    train = write_img2dataset(root / "train", 4)
    val = write_img2dataset(root / "val", 1, first=7)
    return root, train, val


def keys_of(texts) -> list[str]:
    return [t.removeprefix("pair ") for t in texts]


def all_keys(urls) -> list[str]:
    return [f"{Path(u).stem}{i:04d}" for u in urls for i in range(PER_SHARD)]


def reader_keys(urls, rank: int, world_size: int, workers: int, **kw) -> list[str]:
    """Every key one rank's DataLoader workers read in epoch 0 (batch_size=None: no batching)."""
    ds = build_dataset("shards", "train", urls=urls, image_size=PX, **kw)
    ds.rank, ds.world_size = rank, world_size
    return [s["key"] for s in DataLoader(ds, batch_size=None, num_workers=workers)]


def test_two_seeds_orders_never_coincide_shifted(data):
    _, train, _ = data
    perms = {(s, e): tuple(torch.cat([torch.tensor(b) for b in _take(GlobalBatchSampler(64, 16, 0, 1, s, 4 * e), 4)])
                           [:, 1].tolist()) for s in range(5) for e in range(4)}
    assert len(set(perms.values())) == len(perms)  # no (seed, epoch) repeats another's order
    assert len({mixed_seed(s, e, 0) for s in range(50) for e in range(50)}) == 2500
    orders = {}
    for seed in (0, 1):
        ds = build_dataset("shards", "train", urls=train, image_size=PX, seed=seed, shuffle_buffer=8)
        for epoch in (0, 1, 2):
            orders[seed, epoch] = [s["key"] for s in ds.stream(epoch)]
    assert orders[1, 0] != orders[0, 1] and orders[1, 1] != orders[0, 2]  # seed + epoch shared these
    assert len({tuple(o) for o in orders.values()}) == 6


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_every_epoch_reshuffles_with_workers_and_batches_mix_shards(data):
    _, train, _ = data
    ds = build_dataset("shards", "train", urls=train, image_size=PX, shuffle_buffer=8)
    batches = ShardBatches(ds, local_batch=4, num_workers=2)
    epoch0 = [keys_of(next(batches)["text"]) for _ in range(12)]  # 48 pairs, 2 workers x 6 batches
    assert batches.state() == {"epoch": 0, "batch": 12, "num_workers": 2, "world_size": 1}
    epoch1 = [keys_of(next(batches)["text"]) for _ in range(12)]
    assert batches.state()["epoch"] == 1
    flat0, flat1 = sum(epoch0, []), sum(epoch1, [])
    assert sorted(flat0) == sorted(flat1) == all_keys(train)  # every pair once per epoch
    assert flat0 != flat1  # reshuffled
    consecutive = sum(all(int(b[i + 1]) == int(b[i]) + 1 for i in range(3)) for b in epoch0)
    assert consecutive == 0, epoch0  # the buffer mixes samples, not runs of one shard


def test_ranks_times_workers_read_every_key_once(data):
    _, train, _ = data
    keys = [k for rank in (0, 1) for k in reader_keys(train, rank, 2, 2)]
    assert sorted(keys) == all_keys(train)  # 2 x 2 readers, 4 shards: nothing duplicated or dropped
    subset = [k for rank in (0, 1) for k in reader_keys(train, rank, 2, 2, subset=40)]
    assert sorted(subset) == all_keys(train)[:40]  # exact: the first 40 of the listed shards
    assert sorted(reader_keys(train[:1], 0, 1, 2, subset=10)) == all_keys(train[:1])[:10]  # 1 shard, 2 workers


def test_decodes_grayscale_cmyk_and_rgba(data):
    _, train, _ = data
    ds = build_dataset("shards", "val", urls=train[0], image_size=PX)
    samples = list(ds)
    assert len(samples) == PER_SHARD and ds.stats["ok"] == PER_SHARD and sum(ds.stats.values()) == PER_SHARD
    assert {s["image"].shape for s in samples} == {(3, PX, PX)}


def test_fail_fast_with_one_line(data, tmp_path):
    _, train, _ = data
    two_ranks = build_dataset("shards", "train", urls=train[0], image_size=PX)
    two_ranks.rank, two_ranks.world_size = 0, 2
    with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 readers \(2 rank\(s\) x 1 worker"):
        ShardBatches(two_ranks, 4, num_workers=0)
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 8 readers"):
        make_batches(build_dataset("shards", "train", urls=train, image_size=PX), 8, 0, 8, 0, 1, 0)
    too_big = make_batches(build_dataset("shards", "train", urls=train, image_size=PX), 64, 0, 0, 0, 1, 0)
    with pytest.raises(ValueError, match="no full batch of 64 pairs"):
        next(too_big)
    pattern = str(Path(train[0]).parent / "{00000..00005}.tar")  # 00004 and 00005 are missing
    with pytest.raises(FileNotFoundError, match=r"2 of 6 shards missing \(first: .*00004.tar\)"):
        build_dataset("shards", "train", urls=pattern)


def test_hf_route_keeps_mixed_formats(data):
    pytest.importorskip("datasets")
    _, train, _ = data
    urls = str(Path(train[0]).parent / "{00000..00001}.tar")
    hub = build_dataset("hf", "val", urls=urls, image_size=PX)
    ours = build_dataset("shards", "val", urls=urls, image_size=PX)
    a, b = list(hub), list(ours)
    assert hub.stats["ok"] == 2 * PER_SHARD and [s["key"] for s in a] == [s["key"] for s in b] == all_keys(train[:2])
    assert all(torch.equal(x["image"], y["image"]) and x["text"] == y["text"] for x, y in zip(a, b, strict=True))
    trained = ShardBatches(build_dataset("hf", "train", urls=urls, image_size=PX, shuffle_buffer=8), 4, 0)
    assert sorted(k for _ in range(6) for k in keys_of(next(trained)["text"])) == all_keys(train[:2])


def test_feature_extraction_splits_a_shard_over_workers(data):
    _, train, _ = data
    source = build_dataset("shards", "val", urls=train[0], image_size=PX)
    flat = nn.Flatten()
    one = _extract_shard(source, train[0], flat, torch.device("cpu"), batch_size=5, workers=0)
    two = _extract_shard(source, train[0], flat, torch.device("cpu"), batch_size=5, workers=2)
    assert len(two[1]) == PER_SHARD and two[1] == one[1] == [f"pair {k}" for k in all_keys(train[:1])]
    np.testing.assert_array_equal(two[0], one[0])


def shard_cfg(root, train, val, name, **overrides) -> TrainConfig:
    base = TrainConfig(dataset="shards", train_data=str(Path(train[0]).parent / "{00000..00003}.tar"),
                       val_data=val[0], data_kwargs={"shuffle_buffer": 8}, image_size=PX, steps=14, batch_size=8,
                       warmup_steps=1, num_workers=2, save_every=4, snapshot_every=0, progress=False,
                       out=str(root / name), eval_max_samples=12)
    return base.with_overrides(overrides)


def test_held_out_data_is_never_the_training_shards(data, capsys, tmp_path):
    root, train, val = data
    with pytest.raises(ValueError, match="no held-out shards"):
        split_kwargs("shards", "val", {"urls": train})
    assert split_kwargs("shards", "test", {"urls": train, "subset": 9}, val_data=val[0]) == {"urls": val[0]}
    with pytest.raises(ValueError, match="for dataset shards or hf"):
        TrainConfig(val_data="x.tar")
    recipe = {"urls": "recipe-{0..9}.tar", "shuffle_buffer": 8}  # a recipe's shards; --train-data replaces them
    assert split_kwargs("shards", "train", recipe, train_data="mine.tar") == {"urls": "mine.tar", "shuffle_buffer": 8}
    cfg = shard_cfg(tmp_path, train, val, "run", steps=2, num_workers=0)
    assert default_eval_fn(cfg.with_overrides({"val_data": None})) is None
    assert "evaluation skipped: no held-out shards" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="fix --val-data"):
        default_eval_fn(cfg.with_overrides({"val_data": str(tmp_path / "absent.tar")}))
    summary = fit(cfg, default_eval_fn(cfg))
    assert set(k.split("/")[0] for k in summary["eval"]) == {"val", "chance"}
    assert summary["eval"]["chance/val/retrieval/i2t_R@1"] == pytest.approx(1 / PER_SHARD)  # the 12 val pairs
    results = evaluate.main(["--checkpoint", summary["checkpoint"], "--val-data", val[0], "--batch-size", "12"])
    assert results["chance/val/retrieval/i2t_R@1"] == pytest.approx(1 / PER_SHARD) and "test/retrieval/i2t_R@1" not in results
    ckpt = read_checkpoint(summary["checkpoint"])
    ckpt["config"]["val_data"] = None  # a run trained without held-out shards
    torch.save(ckpt, tmp_path / "noval.pt")
    with pytest.raises(SystemExit, match="no held-out shards"):
        evaluate.main(["--checkpoint", str(tmp_path / "noval.pt")])


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_uninterrupted(data):
    root, train, val = data
    full = shard_cfg(root, train, val, "full")
    fit(full)  # 48 pairs, batch 8: 6 batches an epoch, 14 steps = epochs 0, 1 and 2
    killed = shard_cfg(root, train, val, "killed")
    args = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in killed.to_dict().items()
            if k in ("dataset", "train_data", "val_data", "data_kwargs", "image_size", "steps", "batch_size",
                     "warmup_steps", "num_workers", "save_every", "snapshot_every", "progress", "out")]
    proc = subprocess.Popen([sys.executable, "-m", "pdclip.train", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline = Path(killed.out) / "checkpoint.pt", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # kill as soon as step 8 is saved (epoch 1)
        if ckpt.is_file() and read_checkpoint(ckpt)["step"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = read_checkpoint(ckpt)
    assert proc.returncode == -signal.SIGKILL and saved["step"] < 14, proc.stderr.read()[-2000:]
    assert saved["data"]["epoch"] * 6 + saved["data"]["batch"] == saved["step"]
    fit(killed.with_overrides({"resume": True}))
    assert losses(killed.out) == pytest.approx(losses(full.out), abs=1e-6, rel=0)
    assert read_checkpoint(killed.out)["data"] == read_checkpoint(full.out)["data"] == {
        "epoch": 2, "batch": 2, "num_workers": 2, "world_size": 1}
