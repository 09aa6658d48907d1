"""Multi-positive targets: a caption identical to pair i's own caption is a right answer for image i
(docs/methods.md §8).

CLIP's one-hot targets penalise image i for scoring caption j even when caption j is, character for
character, the caption of i ("a view of the city" twice in one CC3M batch, "untitled" in the synthetic
source, a repeated title in clip art): the loss asks the model to tell apart two equal strings. Here
each row's positive mass is spread uniformly over every pair of the (global) batch whose caption is
identical to its own, and the soft-target methods mix into that base instead of into `I`.

Equality is decided on normalised captions — Unicode NFKC, case-folded, runs of whitespace collapsed
to one space, ends stripped — so "A  dog." and "a dog." are one caption and "a dog" and "a dog." are
two. Each caption becomes a 64-bit key (BLAKE2b), a tensor that `torch.distributed` can gather, so under
DDP equality is decided on the global batch. Identical images are an option: the key of an image is the
hash of its tensor's bytes (exact copies only; two augmented views of one picture differ).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def normalise_caption(text: str) -> str:
    """The form two captions are compared in: NFKC, case-folded, whitespace collapsed and stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def caption_keys(texts: Sequence[str]) -> Tensor:
    """One int64 key per caption, `(B,)`; equal keys mean equal normalised captions."""
    return torch.tensor([_key(normalise_caption(t).encode()) for t in texts], dtype=torch.long)


def image_keys(images: Tensor) -> Tensor:
    """One int64 key per image (any `(B, ...)` tensor, e.g. pixels or cached features): a hash of its bytes."""
    rows = images.detach().cpu().contiguous().reshape(images.shape[0], -1).numpy()
    return torch.tensor([_key(row.tobytes()) for row in rows], dtype=torch.long)


@torch.no_grad()
def positive_targets(caption_keys: Tensor, image_keys: Tensor | None = None) -> Tensor:
    """The multi-positive base `(B, B)`: row i spreads its mass uniformly over every pair j whose
    caption (or, given `image_keys`, whose image) is identical to pair i's.

    The matrix is symmetric before its rows are normalised, so it serves both directions (image→text
    rows and text→image rows). With all keys distinct it is exactly `I`.

    Args:
        caption_keys: `(B,)` int64 from `caption_keys`, for the global batch.
        image_keys: optional `(B,)` int64 from `image_keys`.
    """
    same = caption_keys[:, None] == caption_keys[None, :]
    if image_keys is not None:
        same |= image_keys[:, None] == image_keys[None, :]
    same = same.float()
    return same / same.sum(dim=-1, keepdim=True)


def duplicate_rate(texts: Sequence[str], batch_size: int, n_batches: int = 200, seed: int = 0) -> dict[str, float]:
    """How often random batches of `texts` hold identical captions.

    Returns:
        `{"batches_with_duplicates": share of batches with at least one repeated caption,
        "rows_with_duplicates": mean share of a batch's rows whose caption occurs twice or more}`.
    """
    if len(texts) < batch_size:
        raise ValueError(f"{len(texts)} captions are fewer than batch_size={batch_size}")
    keys = caption_keys(texts).numpy()
    rng = np.random.default_rng(seed)
    with_dup, rows = 0, 0.0
    for _ in range(n_batches):
        batch = keys[rng.choice(len(keys), batch_size, replace=False)]
        _, inverse, counts = np.unique(batch, return_inverse=True, return_counts=True)
        repeated = counts[inverse] > 1
        with_dup += bool(repeated.any())
        rows += repeated.mean()
    return {"batches_with_duplicates": with_dup / n_batches, "rows_with_duplicates": float(rows / n_batches)}


def main(argv: list[str] | None = None) -> int:
    """`python -m pdclip.positives`: how often training batches hold identical captions, per source."""
    import argparse

    from pdclip.data import build_dataset

    parser = argparse.ArgumentParser(prog="python -m pdclip.positives", description=main.__doc__)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8],
                        help="noise levels nu: synthetic p_mismatch = p_vague = nu / 2; clip art caption_noise = nu")
    parser.add_argument("--n-train", type=int, default=2000)
    args = parser.parse_args(argv)
    sources = {f"synthetic, nu = {nu:g}": ("synthetic", {"n_train": args.n_train, "p_mismatch": nu / 2,
                                                         "p_vague": nu / 2}) for nu in args.noise}
    sources.update({f"clip art, caption noise {nu:g}": ("clipart", {"caption_noise": nu}) for nu in args.noise})
    print("| source | batch | batches with a repeated caption | rows whose caption repeats |\n|---|---|---|---|")
    for label, (name, kwargs) in sources.items():
        try:
            texts = build_dataset(name, "train", **kwargs).texts
        except FileNotFoundError as e:  # clip art not fetched: say so, keep the other rows
            print(f"| {label} | - | unavailable: {str(e).splitlines()[0]} | |")
            continue
        for b in args.batch_size:
            rate = duplicate_rate(texts, b)
            print(f"| {label} | {b} | {rate['batches_with_duplicates']:.0%} | {rate['rows_with_duplicates']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
