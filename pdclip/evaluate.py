"""Evaluate a dual encoder: features once per dataset, then every metric of `pdclip.metrics` on them.

`evaluate_model` is what periodic evaluation calls (cheap with `max_samples`) and the CLI runs:

    python -m pdclip.evaluate --checkpoint runs/x/checkpoint.pt --dataset synthetic --out results.json
    python -m pdclip.evaluate --checkpoint runs/cc3m --val-data 'data/cc3m/cc3m-validation-{0000..0015}.tar'

Shard sources (`shards`, `hf`) are scored only on held-out shards (`--val-data`, or the run's
`val_data`), reported as "val"; the training shards are never called val or test.

Results are flat `dict[str, float]` (`"{split}/zeroshot/{task}/{metric}"`, `"{split}/retrieval/{metric}"`,
`"linear_probe/{metric}"`), ready for JSON and a metrics log; the CLI adds `"target_quality/..."` from
the run's latest snapshot when the dataset knows its true image–caption correspondence (synthetic).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from pdclip import metrics
from pdclip.data import BatchedDataset, collate

PROBE_SPLITS = ("train", "val", "test")


@dataclass
class Features:
    """Everything the metrics need from one model on one dataset, computed in one pass.

    Attributes:
        image: `(N, D)` normalised image features.
        indices: `(N,)` the dataset index of each row.
        labels: `(N,)` the sample labels, or None when the dataset has none.
        text: `(M, D)` normalised features of the retrieval captions.
        text_to_image: `(M,)` the row of `image` each caption describes.
    """

    image: Tensor
    indices: Tensor
    labels: Tensor | None
    text: Tensor
    text_to_image: Tensor


def subset_indices(n: int, max_samples: int | None) -> Tensor:
    """`(min(n, max_samples),)` evenly spaced indices, so a small evaluation still spans the data."""
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    return torch.linspace(0, n - 1, max_samples).round().long()


@torch.no_grad()
def encode_texts(model, texts: list[str], device: str | torch.device, batch_size: int) -> Tensor:
    """`(T, D)` normalised text features of `texts`, on the CPU."""
    chunks = [model.encode_text(model.text_inputs(texts[s : s + batch_size]).to(device)).float().cpu()
              for s in range(0, len(texts), batch_size)]
    return torch.cat(chunks)


def sample_batches(dataset: Dataset, indices: Tensor | None, batch_size: int, max_samples: int | None):
    """Collated batches of the chosen samples (all of a map-style subset; the first ones of a stream;
    cached features' unaugmented view, `pdclip.features.CachedFeatures.get_batch`)."""
    if isinstance(dataset, IterableDataset):
        stream = itertools.islice(dataset, max_samples)
        while batch := list(itertools.islice(stream, batch_size)):
            yield collate(batch)
    elif isinstance(dataset, BatchedDataset):
        for chunk in indices.split(batch_size):
            yield dataset.get_batch([(0, i) for i in chunk.tolist()])
    else:
        yield from DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, collate_fn=collate)


@torch.no_grad()
def compute_features(model, dataset: Dataset, *, device: str | torch.device = "cpu", batch_size: int = 256,
                     max_samples: int | None = None) -> Features:
    """Encode a dataset's images and its retrieval captions once.

    Captions come from `dataset.retrieval_captions()` when it exists (clean, several per image),
    else each sample's own caption.

    Args:
        model: the encoder interface of `pdclip.models.DualEncoder` (`image_inputs`, `text_inputs`,
            `encode_image`, `encode_text`), which `HeadsOnly` shares; put in eval mode by the caller.
        dataset: map-style or iterable; samples `{"image", "text", "index"(, "label")}`; or cached
            backbone features (`CachedFeatures`, with `pdclip.features.HeadsOnly` as the model).
        max_samples: evaluate on at most this many samples (evenly spaced for map-style datasets).
    """
    indices = None if isinstance(dataset, IterableDataset) else subset_indices(len(dataset), max_samples)
    images, seen, labels, own_texts = [], [], [], []
    for batch in sample_batches(dataset, indices, batch_size, max_samples):
        images.append(model.encode_image(model.image_inputs(batch).to(device)).float().cpu())
        seen.append(batch["index"])
        labels.append(batch.get("label"))
        own_texts += batch["text"]
    if not images:
        raise ValueError("compute_features got an empty dataset")
    indices = torch.cat(seen)
    if hasattr(dataset, "retrieval_captions"):
        texts, text_to_image = select_captions(*dataset.retrieval_captions(), indices)
    else:
        texts, text_to_image = own_texts, torch.arange(len(own_texts))
    return Features(
        image=torch.cat(images), indices=indices,
        labels=None if any(y is None for y in labels) else torch.cat(labels),
        text=encode_texts(model, texts, device, batch_size), text_to_image=text_to_image,
    )


def select_captions(texts: list[str], text_to_image: Tensor, indices: Tensor) -> tuple[list[str], Tensor]:
    """Keep the captions of the images in `indices` `(N,)`; renumber their owners to rows 0..N-1."""
    row_of = torch.full((int(max(text_to_image.max(), indices.max())) + 1,), -1, dtype=torch.long)
    row_of[indices] = torch.arange(len(indices))
    rows = row_of[text_to_image]
    keep = (rows >= 0).nonzero().flatten()
    return [texts[i] for i in keep.tolist()], rows[keep]


def zeroshot_results(model, dataset: Dataset, feats: Features, cache: dict, device,
                     batch_size: int) -> tuple[dict, dict, dict]:
    """Every zero-shot task of `dataset` on precomputed image features, the chance level of each
    score, and each task's `(N,)` predicted classes and labels (`"zeroshot/{task}/pred"`, `.../label`).

    `cache` maps (class names, templates) to class embeddings, so tasks shared by several splits
    are encoded once per model.
    """
    out, chance, samples = {}, {}, {}
    for name, task in getattr(dataset, "zeroshot_tasks", {}).items():
        key = (tuple(task.classnames), tuple(task.templates))
        if key not in cache:
            cache[key] = metrics.class_embeddings(
                lambda texts: encode_texts(model, texts, device, batch_size), task.classnames, task.templates)
        multilabels = None if task.multilabels is None else [task.multilabels[i] for i in feats.indices.tolist()]
        labels = task.labels[feats.indices]
        scores = metrics.zeroshot_metrics(feats.image, cache[key], labels, multilabels)
        out.update({f"zeroshot/{name}/{k}": v for k, v in scores.items()})
        samples[f"zeroshot/{name}/pred"] = (feats.image.float() @ cache[key].float().T).argmax(dim=1)
        samples[f"zeroshot/{name}/label"] = labels
        floor = metrics.zeroshot_chance(labels, len(task.classnames), multilabels)
        chance.update({f"zeroshot/{name}/{k}": v for k, v in floor.items() if k in scores})
    return out, chance, samples


def evaluate_model(model, datasets: dict[str, Dataset], **kwargs) -> dict[str, float]:
    """Zero-shot, retrieval and linear-probe scores of `model` on named datasets: the scores of
    `evaluate_samples` (which documents the keyword arguments and keys), without per-sample outcomes."""
    return evaluate_samples(model, datasets, **kwargs)[0]


def evaluate_samples(
    model,
    datasets: dict[str, Dataset],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    max_samples: int | None = None,
    linear_probe: bool = True,
    probe_only: tuple[str, ...] = (),
) -> tuple[dict[str, float], dict[str, dict[str, list[int]]]]:
    """Zero-shot, retrieval and linear-probe scores of `model` on named datasets (usually splits).

    Features are computed once per dataset and shared by every metric. The linear probe runs when
    `datasets` holds "train", "val" and "test" with labels: fit on train, C chosen on val.

    Args:
        model: the encoder interface (`image_inputs`, `text_inputs`, `encode_image`, `encode_text`); its
            train/eval mode is restored.
        datasets: name -> dataset, e.g. `{"val": ..., "test": ..., "shift": ...}`.
        max_samples: at most this many samples per dataset (keeps periodic evaluation cheap).
        probe_only: datasets that only feed the linear probe (e.g. "train"): not scored themselves.

    Returns:
        `(scores, samples)`. Scores: flat `{"{name}/zeroshot/{task}/{metric}", "{name}/retrieval/{metric}",
        "linear_probe/{acc,val_acc,C}"}`, and for each score `"chance/" + key` its chance level
        (`pdclip.metrics.zeroshot_chance`, `retrieval_chance`; the probe's: the majority class).
        `samples[name]`: per-sample outcomes for bootstraps, `(N,)` lists `"zeroshot/{task}/pred"`,
        `".../label"`, `"retrieval/i2t_hit@1"`, and `(M,)` (captions) `"retrieval/t2i_hit@1"`,
        `"retrieval/text_to_image"`; `samples["linear_probe"]`: the test split's `"pred"`, `"label"`.
    """
    was_training = model.training
    model.eval()
    try:
        feats = {name: compute_features(model, ds, device=device, batch_size=batch_size, max_samples=max_samples)
                 for name, ds in datasets.items()}
        out, samples, cache = {}, {}, {}
        for name, ds in ((n, d) for n, d in datasets.items() if n not in probe_only):
            f = feats[name]
            hits = metrics.retrieval_hits(f.image, f.text, f.text_to_image)
            scores = {f"retrieval/{k}": h.float().mean().item() for k, h in hits.items()}
            chance = {f"retrieval/{k}": v for k, v in metrics.retrieval_chance(f.text_to_image, len(f.image)).items()}
            zeroshot, zeroshot_chance, per_sample = zeroshot_results(model, ds, f, cache, device, batch_size)
            scores.update(zeroshot)
            chance.update(zeroshot_chance)
            out.update({f"{name}/{k}": v for k, v in scores.items()})
            out.update({f"chance/{name}/{k}": v for k, v in chance.items()})
            per_sample.update({"retrieval/i2t_hit@1": hits["i2t_R@1"], "retrieval/t2i_hit@1": hits["t2i_R@1"],
                               "retrieval/text_to_image": f.text_to_image})
            samples[name] = {k: v.int().tolist() for k, v in per_sample.items()}
    finally:
        model.train(was_training)
    if linear_probe and all(s in feats and feats[s].labels is not None for s in PROBE_SPLITS):
        probe, pred = metrics.linear_probe_predictions(*[(feats[s].image, feats[s].labels) for s in PROBE_SPLITS])
        out.update({f"linear_probe/{k}": v for k, v in probe.items()})
        test = feats["test"].labels
        out["chance/linear_probe/acc"] = torch.bincount(test).max().item() / len(test)  # the majority class
        samples["linear_probe"] = {"pred": pred.tolist(), "label": test.tolist()}
    return out, samples


def robustness_table(results: dict[str, dict[str, float]], baselines: list[str], key: str,
                     id_split: str = "test", shift_split: str = "shift") -> dict[str, float]:
    """Effective robustness of each model against the trend line of `baselines`.

    Args:
        results: model name -> its `evaluate_model` dict.
        baselines: names in `results` whose (in-distribution, shifted) accuracies fix the trend line.
        key: the metric, e.g. `"zeroshot/colour_shape/top1"`, read at `"{id_split}/{key}"` and
            `"{shift_split}/{key}"`.

    Returns:
        model name -> shifted accuracy minus the trend's prediction (positive = more robust).
    """
    missing = [b for b in baselines if b not in results]
    if missing:
        raise ValueError(f"baselines {missing} are not in results ({sorted(results)})")
    id_acc = {n: r[f"{id_split}/{key}"] for n, r in results.items()}
    shift_acc = {n: r[f"{shift_split}/{key}"] for n, r in results.items()}
    names = list(results)
    er = metrics.effective_robustness([id_acc[n] for n in names], [shift_acc[n] for n in names],
                                      [id_acc[b] for b in baselines], [shift_acc[b] for b in baselines])
    return dict(zip(names, er.tolist(), strict=True))


# ---------------------------------------------------------------- soft-target quality of a run


def snapshot_target_quality(snapshot: dict, dataset, mix_alpha: float = 0.5) -> dict[str, float]:
    """Target quality (`metrics.target_quality`) of a training snapshot of the probe batch.

    KD and OTTER store only their soft targets `Y`; their loss mixes in the hard targets, so the
    targets the student is pulled towards are `mix_alpha * I + (1 - mix_alpha) * Y` (ignoring their
    second temperature), and that mixture is what is scored. PSD's snapshots hold its teacher's
    predictions mixed in on the chosen rows; the off-diagonal precision is the teacher's (α cancels).
    With `psd_teacher="self"` that teacher is the student's own forward: the precision then scores the
    student's predictions (softened by `T_soft`), not a distillation signal from another model.

    Args:
        snapshot: a `<run>/snapshots/step_*.pt` dict with `"targets_i2t"`, `"targets_t2i"` `(B, B)`,
            `"index"` `(B,)` and `"method"`.
        dataset: the training dataset, with `true_correspondence(indices) -> (B, B)`.
        mix_alpha: the run's `cfg.loss.mix_alpha`.

    Returns:
        `{"i2t/{metric}": ..., "t2i/{metric}": ...}`; text→image rows are captions, so its truth is
        transposed.
    """
    if not hasattr(dataset, "true_correspondence"):
        raise ValueError(f"{type(dataset).__name__} has no true_correspondence: target quality needs known truth")
    truth = dataset.true_correspondence(snapshot["index"])
    out = {}
    for direction, m in (("i2t", truth), ("t2i", truth.T)):
        y = snapshot[f"targets_{direction}"].double()
        if snapshot["method"] in ("kd", "otter"):
            y = mix_alpha * torch.eye(len(y), dtype=y.dtype) + (1 - mix_alpha) * y
        out.update({f"{direction}/{k}": v for k, v in metrics.target_quality(y, m).items()})
    return out


def run_target_quality(run_dir: str | Path, dataset, mix_alpha: float = 0.5) -> list[dict[str, float]]:
    """`snapshot_target_quality` of every snapshot of a run, in step order, each with its `"step"`."""
    paths = sorted(Path(run_dir, "snapshots").glob("step_*.pt"))
    snapshots = (torch.load(p, map_location="cpu", weights_only=True) for p in paths)
    return [{"step": snap["step"], **snapshot_target_quality(snap, dataset, mix_alpha)} for snap in snapshots]


def latest_target_quality(checkpoint: str | Path, train, mix_alpha: float) -> dict[str, float]:
    """`"target_quality/..."` of the run's latest snapshot; empty without snapshots or known truth."""
    if not hasattr(train, "true_correspondence"):
        return {}
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    history = run_target_quality(run_dir, train, mix_alpha)
    return {f"target_quality/{k}": float(v) for k, v in history[-1].items()} if history else {}


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a pdclip checkpoint; write every metric as JSON.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `python -m pdclip.train`")
    p.add_argument("--dataset", default=None,
                   help="a source name of pdclip.data.build_dataset (default: the run's; shards with --val-data)")
    p.add_argument("--val-data", default=None,
                   help="shards / hf: the held-out shards, a brace pattern (default: the run's val_data); "
                        "training shards are never scored as val or test")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits (default: train,val,test, plus shift,shift_mild for synthetic; "
                        "shards / hf: val, the --val-data shards, and train for the training shards)")
    p.add_argument("--out", default=None, help="the JSON file to write (default: print only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--no-linear-probe", action="store_true")
    p.add_argument("--feature-cache", action="store_true",
                   help="frozen towers only: run the heads on cached backbone features (pdclip.features), "
                        "extracting each split once, instead of the full towers on every image")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Evaluate a checkpoint on every split; add the latest snapshot's target quality when the run
    trained on this dataset and the dataset knows its truth."""
    from pdclip.checkpoint import load_checkpoint
    from pdclip.data import SHARD_SOURCES, build_dataset, split_kwargs

    args = parse_args(argv)
    model, cfg = load_checkpoint(args.checkpoint, args.device)
    val_data = args.val_data or cfg.val_data
    if args.dataset is None:
        args.dataset = cfg.dataset if cfg.dataset in SHARD_SOURCES or not args.val_data else "shards"
    shards = args.dataset in SHARD_SOURCES
    default = ["val"] if shards else list(PROBE_SPLITS) + (["shift", "shift_mild"] if args.dataset == "synthetic" else [])
    splits = args.splits.split(",") if args.splits else default
    if shards and not set(splits) <= {"train", "val"}:
        sys.exit(f"error: shards have one held-out set (--val-data), reported as 'val'; got splits {splits}")
    same_data = cfg.dataset == args.dataset
    # Frozen features for every metric: no augmentation, the training split included (linear probe).
    try:
        kwargs = {s: {"image_size": model.image_size, "augment": False,
                      **split_kwargs(args.dataset, s, cfg.data_kwargs if same_data else {}, cfg.train_data, val_data)}
                  for s in splits}
    except ValueError as e:  # held-out shards not given
        sys.exit(f"error: {e}")
    if args.feature_cache:  # the same numbers as the full towers (tests/test_features.py), far cheaper
        from pdclip.features.dataset import CachedFeatures
        from pdclip.features.heads import HeadsOnly

        datasets = {s: CachedFeatures(model, args.dataset, s, kwargs[s], root=cfg.feature_cache_dir) for s in splits}
        encoder = HeadsOnly(model, datasets.values())
    else:
        datasets, encoder = {s: build_dataset(args.dataset, s, **kwargs[s]) for s in splits}, model
    results = evaluate_model(encoder, datasets, device=args.device, batch_size=args.batch_size,
                             max_samples=args.max_samples, linear_probe=not args.no_linear_probe)
    if same_data and not shards:  # snapshot indices point into the training split the run used
        train = datasets["train"] if "train" in datasets else build_dataset(args.dataset, "train", **kwargs[splits[0]])
        results.update(latest_target_quality(args.checkpoint, train, cfg.loss.mix_alpha))
    text = json.dumps(results, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
