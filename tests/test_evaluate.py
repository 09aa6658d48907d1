"""pdclip.evaluate: features once per dataset, metrics wired to the dataset and model contracts."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from pdclip import evaluate
from pdclip.data import ZeroShotTask

N_CLASSES = 3


class OracleModel(nn.Module):
    """Reads sample `i` off its image; caption `i` lands on the image's exact feature, class `c` on
    the class direction. Zero-shot, retrieval and the probe are all perfect, so results are known."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.image_calls, self.text_calls = n, 0, 0
        self.image_size = 8

    def features(self, i: Tensor, cls: Tensor) -> Tensor:
        return F.normalize(torch.cat([F.one_hot(i, self.n), F.one_hot(cls, N_CLASSES)], dim=1).float(), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        self.image_calls += 1
        i = images[:, 0, 0, 0].long()
        return self.features(i, i % N_CLASSES)

    def image_inputs(self, batch: dict) -> Tensor:
        return batch["image"]

    def text_inputs(self, texts: list[str]) -> Tensor:
        # "item 7" / "thing 7" -> 7; a class prompt "a c2" / "the c2" -> n + 2
        return torch.tensor([int(t.split()[-1]) if t.split()[-1].isdigit() else self.n + int(t[-1]) for t in texts])

    def encode_text(self, tokens: Tensor) -> Tensor:
        self.text_calls += 1
        is_class = tokens >= self.n
        own = self.features(tokens.clamp(max=self.n - 1), tokens % N_CLASSES)
        return torch.where(is_class[:, None], F.one_hot(tokens.clamp(min=self.n), self.n + N_CLASSES).float(), own)


class ToyDataset(Dataset):
    """`n` samples, label `i % 3`, two retrieval captions per image, one zero-shot task."""

    def __init__(self, n: int = 12):
        self.n = n
        labels = torch.arange(n) % N_CLASSES
        self.zeroshot_tasks = {"cls": ZeroShotTask([f"c{c}" for c in range(N_CLASSES)], ["a {}", "the {}"],
                                                   labels, [{int(y)} for y in labels])}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 8, 8), float(i)), "text": f"item {i}", "index": i, "label": i % N_CLASSES}

    def retrieval_captions(self) -> tuple[list[str], Tensor]:
        return [w for i in range(self.n) for w in (f"item {i}", f"thing {i}")], torch.arange(self.n).repeat_interleave(2)


def test_evaluate_model_oracle_scores_perfectly_and_encodes_once():
    model = OracleModel(n=12).train()
    splits = {s: ToyDataset() for s in ("train", "val", "test")}
    out = evaluate.evaluate_model(model, splits, batch_size=5)
    assert model.training  # mode restored
    assert model.image_calls == 3 * 3  # 12 samples in batches of 5, once per split
    # 24 captions per split in batches of 5, and 6 class prompts once for all splits
    assert model.text_calls == 3 * 5 + 2
    for s in splits:
        for key in ("retrieval/i2t_R@1", "retrieval/t2i_R@1", "zeroshot/cls/top1", "zeroshot/cls/hit@1",
                    "zeroshot/cls/mean_per_class_recall"):
            assert out[f"{s}/{key}"] == 1.0, key
        assert "zeroshot/cls/top5" not in out
    assert out["linear_probe/acc"] == 1.0
    scores = [k for k in out if not k.startswith("chance/") and k not in ("linear_probe/C", "linear_probe/val_acc")]
    assert sorted(k.removeprefix("chance/") for k in out if k.startswith("chance/")) == sorted(scores)
    assert all(0 < out[f"chance/{k}"] < 1 for k in scores), "every score comes with its chance level"


class NoisyOracle(OracleModel):
    """The oracle with seeded noise on its image features: every score lands strictly between 0 and 1."""

    def encode_image(self, images: Tensor) -> Tensor:
        noise = torch.randn(len(images), self.n + N_CLASSES, generator=torch.Generator().manual_seed(len(images)))
        return F.normalize(super().encode_image(images) + 0.45 * noise, dim=-1)


def test_per_sample_outcomes_reproduce_every_score_they_stand_for():
    """`evaluate_samples` hands the study its per-image outcomes; averaged they are the scores."""
    splits = {s: ToyDataset(n=40) for s in ("train", "val", "test")}
    scores, samples = evaluate.evaluate_samples(NoisyOracle(n=40), splits, probe_only=("train",))
    assert not any(k.startswith("train/") for k in scores)  # the training split only fed the probe
    test = samples["test"]
    right = torch.tensor(test["zeroshot/cls/pred"]) == torch.tensor(test["zeroshot/cls/label"])
    assert 0 < scores["test/zeroshot/cls/top1"] < 1
    assert right.float().mean().item() == pytest.approx(scores["test/zeroshot/cls/top1"])
    for direction in ("i2t", "t2i"):
        hits = torch.tensor(test[f"retrieval/{direction}_hit@1"]).float()
        assert hits.mean().item() == pytest.approx(scores[f"test/retrieval/{direction}_R@1"])
    assert len(test["retrieval/t2i_hit@1"]) == len(test["retrieval/text_to_image"]) == 80  # two captions per image
    probe = samples["linear_probe"]
    assert (torch.tensor(probe["pred"]) == torch.tensor(probe["label"])).float().mean().item() == pytest.approx(
        scores["linear_probe/acc"])


def test_max_samples_subsets_images_and_their_captions():
    model = OracleModel(n=12)
    feats = evaluate.compute_features(model, ToyDataset(), batch_size=4, max_samples=4)
    assert feats.indices.tolist() == [0, 4, 7, 11]
    assert feats.text_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(feats.text[::2], feats.image)  # caption "item i" sits on image i
    out = evaluate.evaluate_model(model, {"val": ToyDataset()}, max_samples=4)
    assert out["val/retrieval/t2i_R@1"] == 1.0 and "linear_probe/acc" not in out


def test_dataset_without_retrieval_captions_uses_its_own():
    class Plain(Dataset):
        def __len__(self) -> int:
            return 12

        __getitem__ = ToyDataset.__getitem__

    feats = evaluate.compute_features(OracleModel(n=12), Plain(), max_samples=6)
    assert feats.text_to_image.tolist() == list(range(6)) and feats.labels.tolist() == [0, 2, 1, 1, 0, 2]  # images 0, 2, 4, 7, 9, 11


def test_iterable_dataset_takes_the_first_max_samples():
    class Stream(IterableDataset):
        def __iter__(self):
            return (ToyDataset()[i] for i in range(12))

    feats = evaluate.compute_features(OracleModel(n=12), Stream(), batch_size=4, max_samples=7)
    assert feats.indices.tolist() == list(range(7)) and feats.text.shape == (7, 15)


def test_subset_indices_rejects_zero():
    with pytest.raises(ValueError, match="max_samples"):
        evaluate.subset_indices(10, 0)


def test_robustness_table():
    results = {
        "a": {"test/m": 0.2, "shift/m": 0.1},
        "b": {"test/m": 0.6, "shift/m": 0.4},
        "c": {"test/m": 0.4, "shift/m": 0.5},
    }
    er = evaluate.robustness_table(results, ["a", "b"], "m")
    assert er["a"] == pytest.approx(0.0, abs=1e-9) and er["b"] == pytest.approx(0.0, abs=1e-9)
    assert er["c"] > 0.2
    with pytest.raises(ValueError, match="baselines"):
        evaluate.robustness_table(results, ["zz", "a"], "m")


def test_snapshot_target_quality_scores_the_mixed_targets_of_kd_and_otter():
    class Truth:
        def true_correspondence(self, indices: Tensor) -> Tensor:
            same = indices[:, None] % 2 == indices[None, :] % 2  # captions describe every image of their parity
            return same

    soft = (Truth().true_correspondence(torch.arange(4)) & ~torch.eye(4, dtype=torch.bool)).double()
    snap = {"method": "otter", "index": torch.arange(4), "targets_i2t": soft, "targets_t2i": soft}
    out = evaluate.snapshot_target_quality(snap, Truth(), mix_alpha=0.25)
    assert out["i2t/true_mass"] == pytest.approx(1.0) and out["t2i/offdiag_mass"] == pytest.approx(0.75)
    assert out["i2t/offdiag_precision"] == 1.0 and out["i2t/chance_offdiag_precision"] == pytest.approx(1 / 3)
    clip = evaluate.snapshot_target_quality({**snap, "method": "clip", "targets_i2t": torch.eye(4)}, Truth())
    assert clip["i2t/true_mass"] == clip["i2t/hard_true_mass"] == 1.0
    with pytest.raises(ValueError, match="true_correspondence"):
        evaluate.snapshot_target_quality(snap, ToyDataset())


@pytest.mark.filterwarnings("ignore:The number of unique classes:UserWarning")  # 48 classes, 12 samples
def test_cli_writes_every_metric_and_the_latest_snapshot_quality(tmp_path):
    from pdclip.config import TrainConfig
    from pdclip.models import create_model

    cfg = TrainConfig(out=str(tmp_path), data_kwargs={"n_train": 24, "n_eval": 12})
    torch.save({"config": cfg.to_dict(), "model": create_model(cfg.model).state_dict()}, tmp_path / "checkpoint.pt")
    (tmp_path / "snapshots").mkdir()
    for step in (2, 5):  # the CLI reports the latest; identity targets score exactly like the hard ones
        torch.save({"step": step, "method": "clip", "index": torch.arange(3, 11), "targets_i2t": torch.eye(8),
                    "targets_t2i": torch.eye(8)}, tmp_path / "snapshots" / f"step_{step:06d}.pt")
    out = tmp_path / "eval" / "results.json"
    evaluate.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(out), "--batch-size", "12"])
    results = json.loads(out.read_text())
    for split in ("train", "val", "test", "shift"):
        assert 0.0 <= results[f"{split}/retrieval/t2i_R@10"] <= 1.0
        assert 0.0 <= results[f"{split}/zeroshot/colour_shape/hit@5"] <= 1.0
    assert "linear_probe/acc" in results and results["target_quality/step"] == 5
    assert results["target_quality/i2t/true_mass"] == pytest.approx(results["target_quality/i2t/hard_true_mass"])
