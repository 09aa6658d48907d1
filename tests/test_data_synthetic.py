"""pdclip.data (synthetic source, collate, transforms): schema, determinism, noise and ground truth."""

import numpy as np
import pytest
import torch

from pdclip.data import build_dataset, collate, synthetic
from pdclip.data.captions import Claims, correspondence
from pdclip.data.scenes import Scenes, render
from pdclip.data.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform, to_uint8

SMALL = {"image_size": 32, "n_train": 400, "n_eval": 200}


@pytest.fixture(scope="module")
def train():
    return build_dataset("synthetic", "train", **SMALL)


def test_unknown_name_and_split_raise():
    with pytest.raises(ValueError, match="unknown dataset name 'imagenet'"):
        build_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="synthetic split must be one of"):
        build_dataset("synthetic", "validation")
    with pytest.raises(ValueError, match="p_mismatch \\+ p_vague"):
        build_dataset("synthetic", "train", p_mismatch=0.7, p_vague=0.5)
    with pytest.raises(ValueError, match="max_objects"):
        build_dataset("synthetic", "train", max_objects=5)


@pytest.mark.parametrize("size", [32, 48])
def test_sample_schema_and_collate(size):
    ds = build_dataset("synthetic", "val", image_size=size, n_eval=8)
    sample = ds[3]
    assert sample["image"].shape == (3, size, size) and sample["image"].dtype == torch.float32
    assert isinstance(sample["text"], str) and sample["text"] and sample["index"] == 3
    assert 0 <= sample["label"] < 48
    batch = collate([ds[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, size, size)
    assert batch["index"].tolist() == [0, 1, 2, 3, 4] and batch["label"].dtype == torch.long
    assert len(batch["text"]) == 5
    with pytest.raises(IndexError):
        ds[8]


def test_deterministic_by_seed_and_splits_differ():
    a, b = (build_dataset("synthetic", "test", n_eval=20, image_size=32) for _ in range(2))
    c = build_dataset("synthetic", "test", n_eval=20, image_size=32, seed=1)
    assert a.texts == b.texts and torch.equal(a[5]["image"], b[5]["image"])
    assert a.texts != c.texts
    val = build_dataset("synthetic", "val", n_eval=20, image_size=32)
    assert not np.array_equal(a.scenes.cx, val.scenes.cx)


def test_normalisation_matches_open_clip_and_inverts():
    from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
    from open_clip.constants import OPENAI_DATASET_STD as STD

    assert OPENAI_DATASET_MEAN == MEAN and OPENAI_DATASET_STD == STD
    pixels = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(to_uint8(image_transform(16, train=False)(pixels)), pixels)


def hand_scene() -> Scenes:
    """One image: a large red (0) circle (0) on the left, a small blue (2) square (1) on the right."""
    arr = lambda *v: np.array([v])  # noqa: E731
    return Scenes(shape=arr(0, 1), colour=arr(0, 2), large=arr(True, False), cx=arr(0.3, 0.7),
                  cy=arr(0.5, 0.5), radius=arr(0.2, 0.1), angle=arr(0.0, 0.0), tint=np.ones((1, 2, 3)),
                  bg=np.zeros((1, 2, 3)), bg_angle=np.zeros(1), bg_period=np.ones(1), shift=0.0)


@pytest.mark.parametrize("mentions, rel, expected", [
    ([(0, 0, -1, -1), (2, 1, -1, -1)], 0, True),    # red circle to the left of blue square
    ([(0, 0, -1, -1), (2, 1, -1, -1)], 1, False),   # ... to the right of: false
    ([(2, 1, -1, -1), (0, 0, -1, -1)], 1, True),    # blue square to the right of red circle
    ([(2, 0, -1, -1)], -1, False),                  # a blue circle: no such object
    ([(0, -1, -1, -1)], -1, True),                  # something red
    ([(-1, 1, 0, 1)], -1, True),                    # a small square on the right
    ([(-1, 1, 1, -1)], -1, False),                  # a big square: the square is small
    ([(0, 0, -1, 0), (0, 0, -1, -1)], 0, False),    # two red circles: only one exists
    ([], -1, True),                                 # a generic phrase describes every image
])
def test_correspondence_on_a_hand_built_scene(mentions, rel, expected):
    claims = Claims.empty(1)
    for m, (colour, shape, size, pos) in enumerate(mentions):
        claims.used[0, m] = True
        claims.colour[0, m], claims.shape[0, m], claims.size[0, m], claims.pos[0, m] = colour, shape, size, pos
    claims.rel[0] = rel
    zero = torch.zeros(1, dtype=torch.long)
    assert correspondence(hand_scene(), zero, claims, zero).item() is expected


def test_true_correspondence_reflects_noise(train):
    truth = train.true_correspondence(torch.arange(len(train)))
    assert truth.shape == (400, 400) and truth.dtype == torch.bool
    diag, kind = truth.diag(), torch.as_tensor(train.noise_kind)
    assert diag[kind != 1].all()  # clean and vague captions are true of their own image
    assert diag[kind == 1].float().mean() < 0.2  # a mismatched caption rarely fits by chance
    off = truth.float().sum() - truth.diag().float().sum()
    assert off > 0  # many-to-many: some captions describe other images too
    test = build_dataset("synthetic", "test", **SMALL)
    assert test.true_correspondence(torch.arange(200)).diag().all()


def test_noise_rates_and_near_duplicates():
    ds = build_dataset("synthetic", "train", n_train=3000, image_size=32, p_mismatch=0.3, p_vague=0.1,
                       p_near_duplicate=0.2)
    rates = np.bincount(ds.noise_kind, minlength=3) / 3000
    assert abs(rates[1] - 0.3) < 0.04 and abs(rates[2] - 0.1) < 0.03
    dup = np.flatnonzero(ds.duplicate_of >= 0)
    assert abs(len(dup) / 3000 - 0.2) < 0.04
    src = ds.duplicate_of[dup]
    assert (ds.scenes.shape[dup] == ds.scenes.shape[src]).all()
    assert (ds.scenes.colour[dup] == ds.scenes.colour[src]).all()
    clean = build_dataset("synthetic", "train", n_train=200, image_size=32, p_mismatch=0, p_vague=0,
                          p_near_duplicate=0)
    assert (clean.noise_kind == 0).all() and (clean.duplicate_of < 0).all()
    assert clean.texts == clean.clean_texts


def test_zeroshot_tasks(train):
    tasks = train.zeroshot_tasks
    assert {k: len(t.classnames) for k, t in tasks.items()} == {"shape": 8, "colour": 6, "colour_shape": 48}
    joint = tasks["colour_shape"]
    assert torch.equal(joint.labels, train.labels)
    assert all(label in multi for label, multi in zip(joint.labels.tolist(), joint.multilabels, strict=True))
    assert all(t.count("{}") == 1 for task in tasks.values() for t in task.templates)
    assert len(np.unique(train.labels.numpy())) > 40  # the classes are all used
    plain = build_dataset("synthetic", "test", n_eval=50, image_size=32, synonyms=False)
    names = plain.zeroshot_tasks["colour_shape"].classnames
    assert all(names[label] in plain.clean_text(i) for i, label in enumerate(plain.labels.tolist()))


def test_retrieval_captions_and_shifted_style():
    test = build_dataset("synthetic", "test", n_eval=30, image_size=32)
    texts, owner = test.retrieval_captions(per_image=3)
    assert len(texts) == 90 and owner.tolist() == [i // 3 for i in range(90)]
    assert texts[3] == test.clean_text(1)
    shift = build_dataset("synthetic", "shift", n_eval=30, image_size=32)
    assert shift.texts != test.texts

    def edges(ds):  # textured backgrounds have far more neighbouring-pixel contrast
        imgs = torch.stack([to_uint8(ds[i]["image"]).float() for i in range(30)])
        return (imgs[..., 1:] - imgs[..., :-1]).abs().mean()

    assert edges(shift) > 1.5 * edges(test)
    # the mild shift: the same scenes' style at a tenth of its contrast, between the two
    mild = build_dataset("synthetic", "shift_mild", n_eval=30, image_size=32)
    assert edges(test) < edges(mild) < edges(shift)


def test_train_transform_shifts_a_little_and_follows_the_seed():
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    train, plain = image_transform(32, train=True), image_transform(32, train=False)(pixels)
    torch.manual_seed(3)
    a = train(pixels)
    torch.manual_seed(3)
    assert torch.equal(a, train(pixels)) and a.shape == (3, 32, 32)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
              if torch.equal(a[:, 2:-2, 2:-2], plain[:, 2 + dy:30 + dy, 2 + dx:30 + dx])]
    assert len(shifts) == 1  # a pure translation by at most 32 // 16 = 2 pixels
    with pytest.raises(ValueError, match="uint8"):
        train(pixels.float())


def test_augment_false_gives_the_training_split_frozen_images():
    plain = build_dataset("synthetic", "train", n_train=8, image_size=32, augment=False)
    assert torch.equal(plain[3]["image"], plain[3]["image"])
    augmented = build_dataset("synthetic", "train", n_train=8, image_size=32)
    torch.manual_seed(0)
    draws = [augmented[3]["image"] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # the default shifts training images


def test_rendered_pixels_are_kept_and_equal_a_fresh_render(monkeypatch):
    ds = build_dataset("synthetic", "val", n_eval=6, image_size=32)
    first = ds[4]["image"]
    assert ds._rendered.tolist() == [False] * 4 + [True, False]
    monkeypatch.setattr(synthetic, "render", lambda *a: pytest.fail("rendered twice"))
    assert torch.equal(ds[4]["image"], first)  # from the cache: the same pixels, not rendered again
    assert np.array_equal(ds._cache[4], render(ds.scenes, 4, 32))
    monkeypatch.setattr(synthetic, "PIXEL_CACHE_BYTES", 6 * 32 * 32 * 3 - 1)  # one byte short: no cache
    assert build_dataset("synthetic", "val", n_eval=6, image_size=32)._cache is None
