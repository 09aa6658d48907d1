"""Pure evaluation metrics on precomputed, L2-normalised features (docs/methods.md §7).

Nothing here touches a model or a dataset: every function takes tensors (or arrays) and returns a
plain `dict[str, float]`, so the same code scores a training run's periodic evaluation, the CLI
`python -m pdclip.evaluate` and hand-made features in the tests. A metric that is undefined for its
input (top-5 with fewer than 5 classes) is left out of the dict rather than reported as NaN.
Taught in the evaluation notebook.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TextEncoder = Callable[[list[str]], Tensor]


def check_features(name: str, x: Tensor) -> None:
    """Raise a ValueError unless `x` is a 2-D `(N, D)` tensor with N > 0."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) tensor, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------- zero-shot classification


@torch.no_grad()
def class_embeddings(
    encode_text: TextEncoder, classnames: Sequence[str], templates: Sequence[str], chunk: int = 256
) -> Tensor:
    """One zero-shot classifier row per class: its prompts encoded, normalised, averaged, renormalised.

    Args:
        encode_text: maps a list of `T` strings to text features `(T, D)`.
        classnames: `C` class names.
        templates: prompts with one `{}` placeholder; several make a prompt ensemble.
        chunk: prompts encoded per call.

    Returns:
        `(C, D)` unit-norm class embeddings.
    """
    if not classnames or not templates:
        raise ValueError("class_embeddings needs at least one class name and one template")
    prompts = [t.format(name) for name in classnames for t in templates]
    feats = torch.cat([encode_text(prompts[s : s + chunk]).float() for s in range(0, len(prompts), chunk)])
    feats = F.normalize(feats, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def topk_hits(logits: Tensor, k: int) -> Tensor:
    """`(N, k)` indices of the k highest-scoring columns of each row of `logits` `(N, C)`."""
    return logits.topk(k, dim=1).indices


def zeroshot_metrics(
    image_features: Tensor,
    classifier: Tensor,
    labels: Tensor,
    multilabels: Sequence[set[int]] | None = None,
    hit_ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Zero-shot classification scores: top-1, top-5, mean per-class recall, and hit@k if multi-label.

    Args:
        image_features: `(N, D)` normalised image features.
        classifier: `(C, D)` class embeddings from `class_embeddings`.
        labels: `(N,)` the class of each image.
        multilabels: optional, per image the set of all correct classes (OTTER's hit@k: an image
            counts if any of its top-k predicted classes is one of them).
        hit_ks: the k of hit@k; a k above the number of classes is left out.

    Returns:
        `{"top1", "top5", "mean_per_class_recall"}` (+ `"hit@k"`), fractions in [0, 1].
    """
    check_features("image_features", image_features)
    if labels.shape != (image_features.shape[0],):
        raise ValueError(f"labels must have shape ({image_features.shape[0]},), got {tuple(labels.shape)}")
    logits = image_features.float() @ classifier.float().T
    n_classes = logits.shape[1]
    out = {"top1": topk_accuracy(logits, labels, 1)}
    if n_classes >= 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    out["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=1), labels)
    if multilabels is not None:
        if len(multilabels) != logits.shape[0]:
            raise ValueError(f"multilabels has {len(multilabels)} entries for {logits.shape[0]} images")
        out.update({f"hit@{k}": hit_at_k(logits, multilabels, k) for k in hit_ks if k <= n_classes})
    return out


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    """Fraction of rows of `logits` `(N, C)` whose label `(N,)` is among the k highest scores."""
    return (topk_hits(logits, k) == labels.view(-1, 1)).any(dim=1).float().mean().item()


def mean_per_class_recall(preds: Tensor, labels: Tensor) -> float:
    """Balanced accuracy: the recall of each class present in `labels` `(N,)`, averaged."""
    recalls = [(preds[labels == c] == c).float().mean() for c in labels.unique()]
    return torch.stack(recalls).mean().item()


def hit_at_k(logits: Tensor, multilabels: Sequence[set[int]], k: int) -> float:
    """OTTER's hit@k: fraction of images with any of their top-k classes in their label set."""
    top = topk_hits(logits, k).tolist()
    return float(np.mean([bool(set(row) & labels) for row, labels in zip(top, multilabels, strict=True)]))


def zeroshot_chance(labels: Tensor, n_classes: int, multilabels: Sequence[set[int]] | None = None,
                    hit_ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """What `zeroshot_metrics` gives a model that knows nothing, key for key.

    top-k: the larger of a uniform guess's `k / C` and always answering the k most frequent classes
    (on unbalanced data the latter wins); balanced accuracy: `1 / C` (constant answers get it too);
    hit@k: a uniform guess of k classes, `1 - C(C - |L|, k) / C(C, k)` per image, averaged.
    """
    counts = torch.bincount(labels, minlength=n_classes).sort(descending=True).values.float()
    top = {"top1": 1}
    if n_classes >= 5:
        top["top5"] = 5
    out = {name: max(k / n_classes, counts[:k].sum().item() / len(labels)) for name, k in top.items()}
    out["mean_per_class_recall"] = 1 / n_classes
    if multilabels is not None:
        for k in (k for k in hit_ks if k <= n_classes):
            miss = [math.comb(n_classes - len(s), k) / math.comb(n_classes, k) for s in multilabels]
            out[f"hit@{k}"] = float(1 - np.mean(miss))
    return out


def retrieval_chance(text_to_image: Tensor, n_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """What `retrieval_metrics` gives a random ranking, key for key: text→image `k / N`; image→text,
    for an image with `p` of the `M` captions, `1 - C(M - p, k) / C(M, k)`, averaged over images."""
    n_txt = len(text_to_image)
    per_image = torch.bincount(text_to_image, minlength=n_images).tolist()
    out = {}
    for k in ks:
        if k <= n_txt:
            out[f"i2t_R@{k}"] = float(1 - np.mean([math.comb(n_txt - p, k) / math.comb(n_txt, k) for p in per_image]))
        if k <= n_images:
            out[f"t2i_R@{k}"] = k / n_images
    return out


# ---------------------------------------------------------------- retrieval


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Image→text and text→image Recall@k with several captions per image.

    Image→text: an image is a hit if *any* of its captions is among its top-k texts. Text→image: a
    caption is a hit if its image is among its top-k images. (CLIP_benchmark calls these
    `text_retrieval_recall@k` and `image_retrieval_recall@k`.) A k above the gallery size is left out.

    Args:
        image_features: `(N, D)` normalised.
        text_features: `(M, D)` normalised.
        text_to_image: `(M,)` LongTensor, the image each caption describes.

    Returns:
        `{"i2t_R@k", "t2i_R@k"}` for each k, fractions in [0, 1] (`retrieval_hits`, averaged).
    """
    hits = retrieval_hits(image_features, text_features, text_to_image, ks, chunk)
    return {name: h.float().mean().item() for name, h in hits.items()}


def retrieval_hits(image_features: Tensor, text_features: Tensor, text_to_image: Tensor,
                   ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, Tensor]:
    """`retrieval_metrics` per query, for bootstraps: `{"i2t_R@k": (N,) bool per image, "t2i_R@k": (M,)
    bool per caption}`."""
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image.shape != (n_txt,) or text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError(f"text_to_image must be (M,) = ({n_txt},) with values in [0, {n_img})")
    img, txt, device = image_features.float(), text_features.float(), image_features.device
    image_ids, text_to_image = torch.arange(n_img, device=device), text_to_image.to(device)
    i2t = recall_hits(img, txt, image_ids, text_to_image, [k for k in ks if k <= n_txt], chunk)
    t2i = recall_hits(txt, img, text_to_image, image_ids, [k for k in ks if k <= n_img], chunk)
    return {**{f"i2t_R@{k}": h for k, h in i2t.items()}, **{f"t2i_R@{k}": h for k, h in t2i.items()}}


def recall_hits(
    queries: Tensor, gallery: Tensor, query_ids: Tensor, gallery_ids: Tensor, ks: Sequence[int], chunk: int = 1024
) -> dict[int, Tensor]:
    """`{k: (Q,) bool}`: does query q have a top-k gallery item of its own id? One top-k per chunk
    serves every k (the largest k's ranking holds the smaller ones').

    Args:
        queries: `(Q, D)`; gallery: `(G, D)`; query_ids: `(Q,)`; gallery_ids: `(G,)` (an image's id is
            its index, a caption's id the index of its image).
        chunk: queries scored at a time, so memory stays `(chunk, G)`.
    """
    if not ks:
        return {}
    hits: dict[int, list[Tensor]] = {k: [] for k in ks}
    for s in range(0, queries.shape[0], chunk):
        same = gallery_ids[topk_hits(queries[s : s + chunk] @ gallery.T, max(ks))] == query_ids[s : s + chunk].view(-1, 1)
        for k in ks:
            hits[k].append(same[:, :k].any(dim=1))
    return {k: torch.cat(h) for k, h in hits.items()}


# ---------------------------------------------------------------- linear probe


def linear_probe(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                 **kwargs) -> dict[str, float]:
    """`linear_probe_predictions`'s scores: `{"acc": test accuracy, "val_acc": best validation accuracy,
    "C": the chosen C}` (the CLIP paper's protocol, documented there)."""
    return linear_probe_predictions(train, val, test, **kwargs)[0]


def linear_probe_predictions(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    Cs: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
    max_iter: int = 1000,
) -> tuple[dict[str, float], np.ndarray]:
    """Logistic regression on frozen, normalised image features (the CLIP paper's protocol).

    The inverse regularisation `C` is chosen by accuracy on `val`; the chosen model is refit on
    train + val and scored on `test`.

    Args:
        train, val, test: `(features (N, D), labels (N,))` pairs.
        Cs: the grid of scikit-learn `C` values (larger = less regularisation).

    Returns:
        `({"acc": test accuracy, "val_acc": best validation accuracy, "C": the chosen C}, (N_test,)
        the chosen model's predicted classes)`; the predictions feed bootstraps over test images.
    """
    from sklearn.linear_model import LogisticRegression  # imported here: sklearn is slow to import

    (xtr, ytr), (xva, yva), (xte, yte) = [(F.normalize(x.float(), dim=-1).numpy(), y.numpy()) for x, y in
                                          (train, val, test)]
    if len(np.unique(ytr)) < 2:
        raise ValueError("linear_probe needs at least two classes in the training split")

    def fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
        with warnings.catch_warnings():  # labels are classes by construction; on a small split (a smoke run)
            # sklearn's guess that many distinct labels mean a regression target is noise
            warnings.filterwarnings("ignore", "The number of unique classes is greater than 50%", UserWarning)
            return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)

    val_accs = [fit(xtr, ytr, c).score(xva, yva) for c in Cs]
    best = int(np.argmax(val_accs))
    final = fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), Cs[best])
    pred = final.predict(xte)
    scores = {"acc": float(np.mean(pred == yte)), "val_acc": float(val_accs[best]), "C": float(Cs[best])}
    return scores, pred


# ---------------------------------------------------------------- intervals over seeds


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean and the half-width of its two-sided t-distribution confidence interval.

    Returns:
        `(mean, half_width, n)`; the half-width is NaN for fewer than two finite values.
    """
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = t.ppf(0.5 + confidence / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


# ---------------------------------------------------------------- effective robustness


def logit(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """The log-odds of accuracies `p`, clipped away from 0 and 1 so it stays finite."""
    p = np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
    return np.log(p / (1 - p))


def fit_trend(id_acc: Sequence[float], shift_acc: Sequence[float]) -> tuple[float, float]:
    """Least-squares line `logit(shift) = slope * logit(id) + intercept` through baseline models.

    Taori et al. (2020) fit on logit-scaled axes because accuracies pile up near 0 and 1 there.

    Returns:
        `(slope, intercept)`.
    """
    x, y = logit(id_acc), logit(shift_acc)
    if x.shape != y.shape or len(np.unique(x)) < 2:
        raise ValueError("fit_trend needs matching lists with at least two distinct in-distribution accuracies")
    slope, intercept = np.polyfit(x, y, deg=1)
    return float(slope), float(intercept)


def trend_accuracy(id_acc: Sequence[float], slope: float, intercept: float) -> np.ndarray:
    """The shifted accuracy the trend line predicts for in-distribution accuracies `id_acc`."""
    return 1.0 / (1.0 + np.exp(-(slope * logit(id_acc) + intercept)))


def effective_robustness(
    id_acc: Sequence[float],
    shift_acc: Sequence[float],
    baseline_id: Sequence[float],
    baseline_shift: Sequence[float],
) -> np.ndarray:
    """Each model's shifted accuracy minus what the baselines' trend line predicts (accuracy units).

    Positive means more robust than the baselines at the same in-distribution accuracy.

    Returns:
        `(n_models,)` residuals.
    """
    slope, intercept = fit_trend(baseline_id, baseline_shift)
    return np.asarray(shift_acc, dtype=float) - trend_accuracy(id_acc, slope, intercept)


# ---------------------------------------------------------------- soft-target quality


def target_quality(targets: Tensor, truth: Tensor) -> dict[str, float]:
    """How much of a `(B, B)` row-stochastic target matrix lands on truly matching pairs.

    Compared with the hard targets (the identity: all mass on the diagonal) and with chance (uniform
    targets). Soft targets move mass off the diagonal; `offdiag_precision` says how much of that moved
    mass lands on true matches, against `chance_offdiag_precision` for mass spread uniformly.

    Args:
        targets: `(B, B)` rows sum to 1 (e.g. a training snapshot's image→text targets).
        truth: `(B, B)` bool, `[i, j]` says caption `j` truly describes image `i`.

    Returns:
        `true_mass`, `hard_true_mass`, `chance_true_mass` (mean per row of the mass on true pairs),
        `offdiag_mass` and `offdiag_true_mass`; `offdiag_precision` only when `offdiag_mass > 0`;
        `chance_offdiag_precision` when B > 1.
    """
    if targets.dim() != 2 or targets.shape[0] != targets.shape[1] or targets.shape != truth.shape:
        raise ValueError(f"targets and truth must both be (B, B), got {tuple(targets.shape)} and {tuple(truth.shape)}")
    t, m = targets.double(), truth.bool()
    if not torch.allclose(t.sum(dim=1), torch.ones_like(t[:, 0]), atol=1e-4):
        raise ValueError("targets rows must sum to 1")
    b = t.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=t.device)
    out = {
        "true_mass": (t * m).sum(1).mean().item(),
        "hard_true_mass": m.diagonal().double().mean().item(),
        "chance_true_mass": m.double().mean().item(),
        "offdiag_mass": (t * off).sum(1).mean().item(),
        "offdiag_true_mass": (t * (m & off)).sum(1).mean().item(),
    }
    if out["offdiag_mass"] > 1e-12:
        out["offdiag_precision"] = out["offdiag_true_mass"] / out["offdiag_mass"]
    if b > 1:
        out["chance_offdiag_precision"] = (m & off).double().sum().item() / (b * (b - 1))
    return out
