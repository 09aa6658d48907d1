"""Captions for synthetic scenes: a small grammar that records what each caption *claims*.

A caption mentions up to two objects. Each mention may state a colour, a shape, a size and a
position; two mentions may be joined by a spatial relation. Unstated fields are -1. Because the
claims are kept as arrays, `correspondence` can decide for any images and captions whether a
caption truly describes an image — including captions written for another image (mismatches),
partial ones ("something red") and generic ones ("a nice picture", which describe every image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pdclip.data.scenes import COLOURS, SHAPES, Scenes

POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
RELATIONS = ("to the left of", "to the right of", "above", "below")
SHAPE_WORDS = {"circle": ["circle", "disc", "round dot"], "square": ["square", "box"],
               "triangle": ["triangle"], "diamond": ["diamond", "rhombus"], "star": ["star"],
               "cross": ["cross", "plus sign"], "ring": ["ring", "donut"], "hexagon": ["hexagon"],
               "semicircle": ["semicircle", "half circle"], "pentagon": ["pentagon"]}
COLOUR_WORDS = {"red": ["red", "crimson"], "purple": ["purple", "violet"], "grey": ["grey", "gray"]}
FRAMES = ["{}", "a photo of {}", "{} on a plain background", "an image showing {}", "there is {} here",
          "my drawing of {}", "look at {}!", "a picture with {}", "clip art: {}", "{}, simple graphic"]
GENERIC = ["a nice picture", "untitled", "check this out", "image", "some shapes", "new wallpaper",
           "IMG_{:04d}.jpg", "my favourite one", "abstract art", "a drawing"]


@dataclass
class Claims:
    """What `N` captions state about up to two mentioned objects; -1 means unstated.

    Attributes:
        shape, colour, size, pos: `(N, 2)`; size 1 = large, 0 = small; pos indexes `POSITIONS`.
        used: `(N, 2)` whether mention m exists; rel: `(N,)` index into `RELATIONS` from mention 0
            to mention 1, or -1.
    """

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    pos: np.ndarray
    used: np.ndarray
    rel: np.ndarray

    @classmethod
    def empty(cls, n: int) -> Claims:
        full = np.full((n, 2), -1)
        return cls(full.copy(), full.copy(), full.copy(), full.copy(), np.zeros((n, 2), bool), np.full(n, -1))

    def copy_row(self, dst: int, src: Claims, src_row: int) -> None:
        for name in ("shape", "colour", "size", "pos", "used", "rel"):
            getattr(self, name)[dst] = getattr(src, name)[src_row]


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def word(rng: np.random.Generator, table: dict[str, list[str]], name: str, synonyms: bool) -> str:
    options = table.get(name, [name])
    return options[rng.integers(len(options))] if synonyms else options[0]


def describe(rng, s: Scenes, i: int, k: int, claims: Claims, row: int, m: int, synonyms: bool) -> str:
    """Noun phrase for object `k` of scene `i`, recorded as mention `m` of caption `row`."""
    colour, shape = list(COLOURS)[s.colour[i, k]], SHAPES[s.shape[i, k]]
    claims.used[row, m], claims.colour[row, m], claims.shape[row, m] = True, s.colour[i, k], s.shape[i, k]
    words = [word(rng, COLOUR_WORDS, colour, synonyms), word(rng, SHAPE_WORDS, shape, synonyms)]
    if rng.random() < 0.25:  # sizes are stated now and then, as people do
        claims.size[row, m] = int(s.large[i, k])
        words.insert(0, ("big" if s.large[i, k] else "small"))
    return article(" ".join(words))


def relation(s: Scenes, i: int, a: int, b: int) -> int:
    """The relation from object `a` to object `b` along their dominant axis."""
    dx, dy = s.cx[i, a] - s.cx[i, b], s.cy[i, a] - s.cy[i, b]
    if abs(dx) >= abs(dy):
        return 0 if dx < 0 else 1
    return 2 if dy < 0 else 3


def clean_caption(rng, s: Scenes, i: int, claims: Claims, row: int, relations: bool, synonyms: bool) -> str:
    """A true, complete-enough caption of scene `i`: the primary object, often a second one."""
    first = describe(rng, s, i, 0, claims, row, 0, synonyms)
    others = np.flatnonzero(s.shape[i] >= 0)[1:]
    if len(others) and rng.random() < 0.7:
        k = int(rng.choice(others))
        second = describe(rng, s, i, k, claims, row, 1, synonyms)
        if relations and rng.random() < 0.5:
            claims.rel[row] = relation(s, i, 0, k)
            phrase = f"{first} {RELATIONS[claims.rel[row]]} {second}"
        else:
            phrase = f"{first} and {second}"
    else:
        phrase = first
        side = 0 if s.cx[i, 0] < 0.4 else 1 if s.cx[i, 0] > 0.6 else -1
        if side >= 0 and rng.random() < 0.3:
            claims.pos[row, 0] = side
            phrase = f"{phrase} {POSITIONS[side]}"
    return FRAMES[rng.integers(len(FRAMES))].format(phrase)


def vague_caption(rng, s: Scenes, i: int, claims: Claims, row: int, synonyms: bool) -> str:
    """A partial description (only the shape, or only the colour) or a generic phrase."""
    kind = rng.integers(3)
    if kind == 2:
        claims.used[row] = False
        return GENERIC[rng.integers(len(GENERIC))].format(int(rng.integers(10000)))
    claims.used[row, 0] = True
    if kind == 0:
        claims.shape[row, 0] = s.shape[i, 0]
        return article(word(rng, SHAPE_WORDS, SHAPES[s.shape[i, 0]], synonyms))
    claims.colour[row, 0] = s.colour[i, 0]
    return f"something {word(rng, COLOUR_WORDS, list(COLOURS)[s.colour[i, 0]], synonyms)}"


def correspondence(s: Scenes, img: Tensor, claims: Claims, cap: Tensor) -> Tensor:
    """`(B, C)` bool: entry `[b, c]` is True iff caption `cap[c]` truly describes image `img[b]`.

    Every mention must match some object (all stated fields equal), and a stated relation must hold
    between two distinct matching objects. A caption with no mentions describes every image.
    """
    def obj(name: str) -> Tensor:  # (B, 1, 1, K)
        return torch.as_tensor(getattr(s, name))[img][:, None, None, :]

    def men(name: str) -> Tensor:  # (1, C, 2, 1)
        return torch.as_tensor(getattr(claims, name))[cap][None, :, :, None]

    pos = torch.stack([obj("cx") < 0.5, obj("cx") > 0.5, obj("cy") < 0.5, obj("cy") > 0.5], dim=-1)
    pos_ok = (pos & torch.nn.functional.one_hot(men("pos").clamp(min=0), 4).bool()).any(-1)
    match = (obj("shape") >= 0) & ((men("shape") < 0) | (obj("shape") == men("shape")))
    match &= (men("colour") < 0) | (obj("colour") == men("colour"))
    match &= (men("size") < 0) | (obj("large").long() == men("size"))
    match &= (men("pos") < 0) | pos_ok  # match: (B, C, 2, K)
    used = men("used").squeeze(-1)
    truth = (~used | match.any(-1)).all(-1)
    rel = torch.as_tensor(claims.rel)[cap]
    if (rel >= 0).any():
        cx, cy = obj("cx")[:, 0, 0], obj("cy")[:, 0, 0]  # (B, K)
        dx, dy = cx[:, :, None] - cx[:, None, :], cy[:, :, None] - cy[:, None, :]  # (B, K, K) a minus b
        holds = torch.stack([dx < 0, dx > 0, dy < 0, dy > 0], dim=-1)  # (B, K, K, 4)
        holds &= ~torch.eye(cx.shape[1], dtype=torch.bool)[None, :, :, None]
        holds = holds[:, None].expand(-1, len(cap), -1, -1, -1)
        r = holds.gather(-1, rel.clamp(min=0)[None, :, None, None, None].expand(holds.shape[:-1] + (1,)))
        pair = match[:, :, 0, :, None] & match[:, :, 1, None, :] & r.squeeze(-1)  # (B, C, K, K)
        truth &= (rel[None, :] < 0) | pair.flatten(2).any(-1)
    return truth
