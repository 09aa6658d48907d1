"""The clip-art source: Debian's `openclipart-png`, ~8,100 drawings in a category tree (notebook 02).

`python -m pdclip.data.clipart fetch --root .cache/openclipart` finds or unpacks the package (no root
needed) and decodes every PNG once into a cache at the working resolution. Decisions, documented:

* Images: each PNG is scaled to fit `size × size` (aspect kept) and composited on white.
* Bad input: Pillow refuses images above its decompression-bomb limit (3 files here, up to 231 MP)
  and warns above half of it (13 more); both are *skipped and counted* (the warning is turned into
  an error, never ignored), as are files Pillow cannot decode. Counts are printed and kept in the
  cache's JSON (`ClipArt(...).counts`).
* Captions: the title in the file name (underscores to spaces; its author names, other languages and
  numbering are the real web-style noise), e.g. `"chemistry flask matthew 02"`. The category path
  is left out by default: the zero-shot classes *are* those folders, so a caption that names its
  folder ("... (science)") would turn zero-shot into reading the label off the caption and caption
  noise into label noise. `category_in_caption=True` appends it, as an ablation (docs/results.md).
* Classes: the top-level folder (`level=1`, e.g. "animals") or the second level (`level=2`, e.g.
  "birds"); categories with fewer than `min_per_class` images, and "unsorted", are dropped
  together with their images, so every kept image has a class.
* Split by image: the first 8 hex digits of md5(relative path) / 2^32: < 0.8 train, < 0.9 val,
  else test. Fixed by the file name, independent of seed, order and machine.
* Caption noise (`caption_noise`, like the synthetic source's `p_mismatch`): a seeded fraction of
  the *training* captions is replaced by the caption of another training image. Val and test ignore
  the knob (they are identical whatever it is), so evaluation stays clean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import cached_property
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from pdclip.data.base import ZeroShotTask
from pdclip.data.transforms import split_transform
from pdclip.runtime import cache_dir

SYSTEM_DIR = Path("/usr/share/openclipart/png")
PNG_SUBDIR = Path("usr/share/openclipart/png")
# A checkout's `.cache/openclipart` (what `make clipart` fills), whatever the working directory
# (notebooks run in notebooks/), or the user's cache folder (`pdclip.runtime.cache_dir`);
# PDCLIP_CLIPART_ROOT overrides it.
DEFAULT_ROOT = Path(os.environ.get("PDCLIP_CLIPART_ROOT") or cache_dir("openclipart"))
HOW_TO_GET = ("openclipart-png is not available. Get it with one of:\n"
              "  Debian/Ubuntu: apt-get download openclipart-png (no root), or sudo apt-get install openclipart-png\n"
              "  Binder: list openclipart-png in binder/apt.txt (this repository does)\n"
              "  Colab: !apt-get install -y openclipart-png\n"
              "then run: python -m pdclip.data.clipart fetch --root .cache/openclipart")
SPLIT_RANGES = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
TEMPLATES = ["a clip art of {}.", "a drawing of {}.", "an icon of {}."]


def find_pngs(root: Path) -> Path | None:
    """The PNG tree: the system's `/usr/share/openclipart/png`, or one unpacked under `root`."""
    for path in (SYSTEM_DIR, root / PNG_SUBDIR):
        if path.is_dir() and any(path.rglob("*.png")):
            return path
    return None


def download(root: Path) -> Path | None:
    """`apt-get download` the package and `dpkg-deb -x` it into `root`; no root user needed."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        got = subprocess.run(["apt-get", "download", "openclipart-png"], cwd=tmp, capture_output=True)
        if got.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # Containers often ship without package lists; as root we may fetch them once.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            got = subprocess.run(["apt-get", "download", "openclipart-png"], cwd=tmp, capture_output=True)
        debs = list(Path(tmp).glob("openclipart-png*.deb"))
        if got.returncode != 0 or not debs:
            print(got.stderr.decode(errors="replace").strip(), file=sys.stderr)
            return None
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return find_pngs(root)


def decode(job: tuple[str, int]) -> tuple[np.ndarray | None, str]:
    """Decode one PNG into a `uint8 (size, size, 3)` array on white; `(None, reason)` if skipped."""
    path, size = job
    with warnings.catch_warnings():
        # A warned image (above half the bomb limit) costs hundreds of MB to decode: skip it too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                im = im.convert("RGBA")
                im.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        except Image.DecompressionBombError:
            return None, "over_bomb_limit"
        except Image.DecompressionBombWarning:
            return None, "over_bomb_warning"
        except (OSError, SyntaxError, ValueError):
            return None, "undecodable"
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas.convert("RGB")), "ok"


def cache_paths(root: Path, size: int) -> tuple[Path, Path]:
    return root / f"images_{size}px.npy", root / f"images_{size}px.json"


def build_cache(png_dir: Path, root: Path, size: int, workers: int = 2) -> dict:
    """Decode every PNG once (progress bar) into `images_{size}px.npy` + `.json`; return the stats.

    Decoded images go straight into memory-mapped files, never into one big array: at 128 px the cache
    is ~400 MB, which a list plus `np.stack` held twice in memory (a notebook on Binder's 2 GB).
    """
    files = sorted(png_dir.rglob("*.png"))
    kept, counts = [], {"ok": 0, "over_bomb_limit": 0, "over_bomb_warning": 0, "undecodable": 0}
    npy, meta = cache_paths(root, size)
    part, tmp = npy.with_suffix(".part.npy"), npy.with_suffix(".tmp.npy")
    decoded = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    with Pool(workers) as pool:
        jobs = [(str(f), size) for f in files]
        results = pool.imap(decode, jobs, chunksize=16)
        for f, (pixels, status) in tqdm(zip(files, results, strict=True), total=len(files), desc="decode clip art"):
            counts[status] += 1
            if pixels is not None:
                decoded[len(kept)] = pixels
                kept.append(f.relative_to(png_dir).as_posix())
    final = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(kept), size, size, 3))
    for start in range(0, len(kept), 1024):  # the kept rows (skipped files left unused rows at the end)
        stop = min(start + 1024, len(kept))
        final[start:stop] = decoded[start:stop]
    final.flush()
    del final, decoded
    part.unlink()
    os.replace(tmp, npy)  # atomic: a half-written cache is never mistaken for a finished one
    meta.write_text(json.dumps({"size": size, "source": str(png_dir), "counts": counts, "paths": kept}))
    return counts


def fetch(root: Path = DEFAULT_ROOT, size: int = 64) -> bool:
    """Make sure the PNGs and the `size` px cache exist under `root`; idempotent. False if unavailable."""
    npy, meta = cache_paths(root, size)
    if npy.exists() and meta.exists():
        print(f"clip art cache ready: {npy}")
        return True
    png_dir = find_pngs(root) or download(root)
    if png_dir is None:
        print(HOW_TO_GET)
        return False
    counts = build_cache(png_dir, root, size)
    print(f"clip art decoded from {png_dir} -> {npy}: {counts['ok']} kept; skipped and counted: "
          f"{counts['over_bomb_limit']} above Pillow's decompression-bomb limit, {counts['over_bomb_warning']} "
          f"above its warning threshold, {counts['undecodable']} undecodable")
    return True


def split_of(relpath: str) -> str:
    """The fixed split of an image, from the md5 of its path relative to the PNG tree."""
    u = int(hashlib.md5(relpath.encode()).hexdigest()[:8], 16) / 2**32
    return next(name for name, (lo, hi) in SPLIT_RANGES.items() if lo <= u < hi)


def category(relpath: str, level: int) -> str | None:
    """The class at `level` (1: top folder, 2: sub-folder), or None where the path is too shallow."""
    parts = relpath.split("/")[:-1]
    return parts[level - 1] if len(parts) >= level else None


def caption(relpath: str, category_in_caption: bool = False) -> str:
    """The title from the file name, e.g. `"jigsaw green 09"`; with `category_in_caption` the
    category path follows it: `"jigsaw green 09 (shapes, jigsaw)"`."""
    *folders, name = relpath.split("/")
    title = " ".join(Path(name).stem.replace("_", " ").split())
    return f"{title} ({', '.join(f.replace('_', ' ') for f in folders)})" if category_in_caption else title


def mismatch_captions(texts: list[str], p: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Give a seeded fraction `p` of the captions to other images: caption `i` becomes that of a
    random other image. Returns the new captions and `(N,)` bool, True where one moved."""
    rng = np.random.default_rng(seed)
    n = len(texts)
    moved = rng.random(n) < p if n > 1 else np.zeros(n, dtype=bool)
    noisy = list(texts)
    for i in np.flatnonzero(moved):
        noisy[i] = texts[(i + 1 + rng.integers(n - 1)) % n]  # any image but this one
    return noisy, moved


class ClipArt(Dataset):
    """OpenClipart drawings with captions from their file names and classes from their folders.

    Args:
        split: "train", "val" or "test" (fixed by file name, see the module docstring).
        root: where `fetch` put the cache (the repository's `.cache/openclipart` by default).
        image_size: output side; the cache is read at `cache_size` and resized when they differ.
        cache_size: resolution of the decoded cache to use (built on first use if missing).
        level: category level of the classes (1 or 2); min_per_class: smaller classes are dropped.
        augment: random shifts on the images; default only for "train".
        caption_noise: fraction of training captions given to another training image (ignored by
            "val" and "test"); noise_seed: seeds which captions move and where.
        category_in_caption: append the category path to every caption (the labels' words: an
            ablation; off by default, see the module docstring).
        max_samples: keep at most this many images of the split, evenly spaced over it (None: all);
            a quick run (the notebooks' smoke mode) then decodes and encodes only those.

    Attributes:
        texts: the caption of each sample (noisy on "train"); clean_texts: before the noise.
        mismatched: `(N,)` bool, True where `texts[i]` was written for another image.
    """

    # Knobs that change only the captions: the feature cache's image key leaves them out.
    caption_only_kwargs = ("caption_noise", "noise_seed", "category_in_caption")

    def __init__(self, split: str = "train", root: str | Path = DEFAULT_ROOT, image_size: int = 64,
                 cache_size: int = 64, level: int = 1, min_per_class: int = 30,
                 augment: bool | None = None, caption_noise: float = 0.0, noise_seed: int = 0,
                 category_in_caption: bool = False, max_samples: int | None = None) -> None:
        if split not in SPLIT_RANGES:
            raise ValueError(f"clipart split must be one of {tuple(SPLIT_RANGES)}, got {split!r}")
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level}")
        if not 0.0 <= caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be None or >= 1, got {max_samples}")
        root = Path(root)
        npy, meta_path = cache_paths(root, cache_size)
        if not (npy.exists() and meta_path.exists()) and not fetch(root, cache_size):
            raise FileNotFoundError(HOW_TO_GET)
        meta = json.loads(meta_path.read_text())
        self.counts = meta["counts"]
        cats = [category(p, level) for p in meta["paths"]]
        sizes = {c: cats.count(c) for c in set(cats) if c is not None and c != "unsorted"}
        self.classnames_raw = sorted(c for c, n in sizes.items() if n >= min_per_class)
        lookup = {c: k for k, c in enumerate(self.classnames_raw)}
        rows = [i for i, (p, c) in enumerate(zip(meta["paths"], cats, strict=True))
                if c in lookup and split_of(p) == split]
        if max_samples is not None and max_samples < len(rows):  # evenly spaced: every class keeps its share
            rows = [rows[k] for k in np.linspace(0, len(rows) - 1, max_samples).round().astype(int)]
        self.images = np.load(npy, mmap_mode="r")
        self.rows = np.array(rows, dtype=np.int64)
        self.paths = [meta["paths"][i] for i in rows]
        self.clean_texts = [caption(p, category_in_caption) for p in self.paths]
        self.texts, self.mismatched = mismatch_captions(self.clean_texts, caption_noise if split == "train" else 0.0,
                                                        noise_seed)
        self.labels = torch.tensor([lookup[cats[i]] for i in rows], dtype=torch.long)
        self.transform = split_transform(image_size, split, augment)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        pixels = torch.from_numpy(np.array(self.images[self.rows[i]])).permute(2, 0, 1)
        return {"image": self.transform(pixels), "text": self.texts[i], "index": i, "label": int(self.labels[i])}

    @cached_property
    def zeroshot_tasks(self) -> dict[str, ZeroShotTask]:
        """One task, "category": the kept folders at the chosen level, as words ("signs and symbols")."""
        names = [c.replace("_", " ").replace("-", " ") for c in self.classnames_raw]
        return {"category": ZeroShotTask(names, TEMPLATES, self.labels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdclip.data.clipart", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128],
                        help="cache resolutions in pixels (64: the from-scratch towers; 128: the pretrained ones)")
    args = parser.parse_args(argv)
    for size in args.size:
        fetch(args.root, size)
    return 0  # unavailable data is not an error: the clip-art tests then skip with HOW_TO_GET


if __name__ == "__main__":
    sys.exit(main())
