"""The synthetic source: rendered scenes with captions whose truth is known (notebook 05).

Each split draws its scenes from its own seeded stream, so `build_dataset("synthetic", split, **kw)`
with the same keywords gives disjoint, reproducible splits. Only "train" is noisy, like web data:

* mismatch (`p_mismatch`): the caption was written for another image of the split;
* vague (`p_vague`): only the shape, only the colour, or a generic phrase ("untitled");
* near-duplicates (`p_near_duplicate`): the scene of another training image, slightly moved, with its
  own background and caption — the many-to-many structure PSD and OTTER try to recover.

"val" and "test" are clean; "shift" is clean but drawn in a new style (striped and checked
backgrounds, striped objects) for effective robustness; "shift_mild" blends that style in at a
fraction of its contrast, a shift that costs accuracy without reaching chance.

The defaults (2,000 training pairs, 8 shapes × 6 colours, up to 2 objects, 20 % mismatched + 20 %
vague captions, 10 % near-duplicates) leave CLIP far below its ceiling. A trial (3-layer CNN and a
2-layer text transformer, 32 px, 800 steps of batch 128, about 2 CPU minutes; colour_shape zero-shot
top-1 on "test", chance 2.1 %): defaults 20.5 %; `n_train=20000` 58.3 %; `n_train=20000` without noise
81.0 %. More pairs, fewer classes or less noise make the task easier.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pdclip.data.base import ZeroShotTask
from pdclip.data.captions import Claims, clean_caption, correspondence, vague_caption
from pdclip.data.scenes import COLOURS, SHAPES, render, sample_scenes
from pdclip.data.transforms import split_transform

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "shift": 3, "shift_mild": 4}
# The style shift of each split (`pdclip.data.scenes.Scenes.shift`): "shift" costs a frozen-tower CLIP
# most of its accuracy (top-1 49 % -> 7 %, chance 3 %), "shift_mild" a part of it (49 % -> 31 %; measured
# at ν = 0.4 after the study's 750 steps), for effective robustness.
SHIFT = {"shift": 1.0, "shift_mild": 0.1}
# A split whose pixels fit in this many bytes keeps each image once rendered (12 KB at 64 px: 2,000
# pairs take 25 MB): rendering is a pure function of the index and costs about what a CPU training
# step spends on a sample, so an epoch after the first pays only for the random shift. Large splits
# at 128 px and more (read once, into a feature cache, by the frozen towers) are not kept.
PIXEL_CACHE_BYTES = 64 * 2**20
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} on a plain background."]
NOISE_KINDS = ("clean", "mismatch", "vague")


class SyntheticCaptions(Dataset):
    """Rendered shapes with noisy captions and a known image–caption correspondence.

    Args:
        split: "train", "val", "test", "shift" or "shift_mild".
        image_size: side in pixels (rendered at that size, any value >= 8).
        n_train: scenes in "train"; n_eval: scenes in each of "val", "test", "shift", "shift_mild".
        n_shapes, n_colours: how many of `SHAPES` / `COLOURS` to use (classes = their product).
        max_objects: objects per scene, uniform in `[1, max_objects]` (primary + small distractors).
        relations: captions may relate two objects ("a red star above a blue ring").
        synonyms: captions may use synonyms ("disc", "violet") instead of the class names.
        p_mismatch, p_vague, p_near_duplicate: noise rates of the "train" split.
        max_rotation: objects turn by up to this many radians either way.
        seed: the seed of every random choice.
        augment: random shifts on the images; default only for "train" (pass False to take frozen
            features of the training split, e.g. for a linear probe).

    Each image is rendered on first use and its pixels kept, if the split fits `PIXEL_CACHE_BYTES`.

    Attributes:
        texts: the (noisy) caption of each sample; clean_texts: the true caption before noise.
        noise_kind: `(N,)` index into `NOISE_KINDS` ("clean", "mismatch", "vague").
        duplicate_of: `(N,)` the scene a near-duplicate copies, -1 for originals.
        scenes: the `Scenes` arrays (true attributes); claims: the `Claims` of `texts`.
    """

    # Knobs that change only the captions (scenes are drawn before the noise): a feature cache of the
    # images leaves them out of its key, so every noise level reuses one extraction.
    caption_only_kwargs = ("p_mismatch", "p_vague")

    def __init__(self, split: str = "train", image_size: int = 64, n_train: int = 2000, n_eval: int = 1000,
                 n_shapes: int = 8, n_colours: int = 6, max_objects: int = 2, relations: bool = True,
                 synonyms: bool = True, p_mismatch: float = 0.2, p_vague: float = 0.2,
                 p_near_duplicate: float = 0.1, max_rotation: float = 0.26, seed: int = 0,
                 augment: bool | None = None) -> None:
        if split not in SPLIT_IDS:
            raise ValueError(f"synthetic split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
        for name, p in (("p_mismatch", p_mismatch), ("p_vague", p_vague), ("p_near_duplicate", p_near_duplicate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if p_mismatch + p_vague > 1.0:
            raise ValueError(f"p_mismatch + p_vague must be <= 1, got {p_mismatch + p_vague}")
        n = n_train if split == "train" else n_eval
        if n < 1:
            raise ValueError(f"the {split} split needs at least one scene, got {n}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.n_shapes, self.n_colours = n_shapes, n_colours
        self.relations, self.synonyms = relations, synonyms
        self.transform = split_transform(image_size, split, augment)
        rng = np.random.default_rng([seed, SPLIT_IDS[split]])
        self.scenes = sample_scenes(rng, n, n_shapes, n_colours, max_objects, max_rotation,
                                    SHIFT.get(split, 0.0))
        noisy = split == "train"
        self.duplicate_of = self._near_duplicates(rng, p_near_duplicate if noisy else 0.0)
        self.claims, self.texts = Claims.empty(n), [""] * n
        self.clean_texts = [clean_caption(rng, self.scenes, i, self.claims, i, relations, synonyms)
                            for i in range(n)]
        self.noise_kind = self._add_noise(rng, p_mismatch if noisy else 0.0, p_vague if noisy else 0.0)
        # np.empty reserves the memory without touching it: pages fill as images are first rendered.
        fits = n * image_size**2 * 3 <= PIXEL_CACHE_BYTES
        self._cache = np.empty((n, image_size, image_size, 3), np.uint8) if fits else None
        self._rendered = np.zeros(n, dtype=bool)

    def _near_duplicates(self, rng: np.random.Generator, p: float) -> np.ndarray:
        """Copy the objects of a random original into a fraction `p` of scenes, nudged a little.

        Returns `(N,)` the source index of each near-duplicate, -1 for originals.
        """
        s, n = self.scenes, len(self.scenes)
        dup = np.flatnonzero(rng.random(n) < p)
        originals = np.setdiff1d(np.arange(n), dup)
        source = np.full(n, -1)
        if len(dup) and len(originals):
            source[dup] = rng.choice(originals, size=len(dup))
            for name in ("shape", "colour", "large", "radius", "angle", "tint", "cx", "cy"):
                getattr(s, name)[dup] = getattr(s, name)[source[dup]]
            nudge = rng.uniform(-0.03, 0.03, size=(len(dup), 2, s.cx.shape[1]))
            s.cx[dup] += nudge[:, 0]
            s.cy[dup] += nudge[:, 1]
        return source

    def _add_noise(self, rng: np.random.Generator, p_mismatch: float, p_vague: float) -> np.ndarray:
        """Replace a fraction of captions by another scene's caption or a vague one; `(N,)` kinds."""
        n, truth = len(self.scenes), self.claims
        self.claims = Claims.empty(n)
        u = rng.random(n)
        kind = np.where(u < p_mismatch, 1, np.where(u < p_mismatch + p_vague, 2, 0))
        for i in range(n):
            if kind[i] == 1 and n > 1:
                other = (i + 1 + rng.integers(n - 1)) % n  # any scene but this one
                self.claims.copy_row(i, truth, other)
                self.texts[i] = self.clean_texts[other]
            elif kind[i] == 2:
                self.texts[i] = vague_caption(rng, self.scenes, i, self.claims, i, self.synonyms)
            else:
                self.claims.copy_row(i, truth, i)
                self.texts[i] = self.clean_texts[i]
        return kind

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        pixels = torch.from_numpy(self._render(i)).permute(2, 0, 1)
        return {"image": self.transform(pixels), "text": self.texts[i], "index": i, "label": int(self.labels[i])}

    def _render(self, i: int) -> np.ndarray:
        """Scene `i` as `uint8` `(S, S, 3)`, rendered on first use and kept if the split fits `PIXEL_CACHE_BYTES`."""
        if self._cache is None:
            return render(self.scenes, i, self.image_size)
        if not self._rendered[i]:
            self._cache[i] = render(self.scenes, i, self.image_size)
            self._rendered[i] = True
        return self._cache[i]

    @cached_property
    def labels(self) -> Tensor:
        """`(N,)` the colour-and-shape class of each primary object: `colour * n_shapes + shape`."""
        return torch.as_tensor(self.scenes.colour[:, 0] * self.n_shapes + self.scenes.shape[:, 0])

    def clean_text(self, i: int) -> str:
        """A true caption of image `i` (the caption before noise was added)."""
        return self.clean_texts[i]

    def true_correspondence(self, indices: Tensor) -> Tensor:
        """`(B, B)` bool: `[a, b]` is True iff the caption of sample `indices[b]` truly describes
        the image of sample `indices[a]` (generic captions describe every image)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return correspondence(self.scenes, idx, self.claims, idx)

    def retrieval_captions(self, per_image: int = 2) -> tuple[list[str], Tensor]:
        """Clean captions for retrieval: the clean caption plus `per_image - 1` rephrasings.

        Returns:
            texts: `M = N * per_image` captions; text_to_image: `(M,)` the image each describes.
        """
        if per_image < 1:
            raise ValueError(f"per_image must be >= 1, got {per_image}")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], 99])  # its own stream
        texts, owner = [], []
        for i in range(len(self)):
            texts.append(self.clean_texts[i])
            texts += [clean_caption(rng, self.scenes, i, Claims.empty(1), 0, self.relations, self.synonyms)
                      for _ in range(per_image - 1)]
            owner += [i] * per_image
        return texts, torch.tensor(owner)

    @cached_property
    def zeroshot_tasks(self) -> dict[str, ZeroShotTask]:
        """Tasks "shape", "colour" and "colour_shape" on the primary object; `multilabels` holds
        every class present in the image (for hit@k)."""
        shapes, colours = self.scenes.shape, self.scenes.colour
        present = shapes >= 0
        joint = colours * self.n_shapes + shapes
        names = {"shape": list(SHAPES[: self.n_shapes]), "colour": list(COLOURS)[: self.n_colours]}
        names["colour_shape"] = [f"{c} {s}" for c in names["colour"] for s in names["shape"]]
        tasks = {}
        for task, ids in (("shape", shapes), ("colour", colours), ("colour_shape", joint)):
            multi = [set(row[ok].tolist()) for row, ok in zip(ids, present, strict=True)]
            templates = ["a photo of something {}.", "a {} shape."] if task == "colour" else TEMPLATES
            tasks[task] = ZeroShotTask(names[task], templates, torch.as_tensor(ids[:, 0]), multi)
        return tasks
