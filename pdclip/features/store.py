"""The on-disk array store: `(N, F)` float32 arrays keyed by JSON data, memory-mapped when read.

`cached_array(root, name, key, rows, chunks, unit)` stores `<root>/<name>-<digest>.npy` beside a `.json`
holding the full key, the shape and the file's sha256; a miss consumes `chunks` and writes atomically
(tmp + `os.replace`, the `.json` last), a hit checks key, shape, size and content before mapping it.
What goes into a key is the callers' business (`pdclip.features.extract`, `pdclip.features.dataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from pdclip.checkpoint import atomic_write_json
from pdclip.runtime import cache_dir

VERSION = 3  # part of every key: bump when extraction or the file layout changes (2: views' seeds; 3: trunks)
DEFAULT_ROOT = Path(os.environ.get("PDCLIP_FEATURE_CACHE") or cache_dir("features"))


class FeatureCacheError(ValueError):
    """A cache file that cannot be trusted (other settings, wrong shape, truncated) or a model
    whose towers cannot be cached (no backbone/head split, trainable backbone)."""


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cached_array(root: Path, name: str, key: dict, rows: int, chunks: Iterator[Tensor], unit: str, *,
                 quiet: bool = False) -> np.ndarray:
    """The `(rows, F)` float32 array stored under `key`, memory-mapped; extracted from `chunks` on a miss.

    Args:
        root: the cache folder; name: a readable file-name prefix (the key's digest follows it).
        key: everything the numbers depend on (JSON data, the backbone's weights included, so they
            fix `F`); it is stored in the `.json`.
        rows: `N`, the number of rows the array must have.
        chunks: `(b, ...)` tensors in row order, each row stored flat (`F` values); only consumed on a miss.
        unit: what a row is ("img", "caption"), for the progress bar.
        quiet: no progress bar or timing line (the caller extracted `chunks` already and timed it).

    Raises:
        FeatureCacheError: the stored file has another key, another shape, or is truncated.
    """
    path = Path(root) / f"{name}-{_digest(key)[:16]}.npy"
    meta = path.with_suffix(".json")
    if meta.is_file():
        print(f"feature cache: reading {path}")
        return _open(path, meta, key, rows)
    print(f"feature cache miss: {'writing' if quiet else 'extracting'} {rows:,} {unit} -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, out, row, tic = path.with_name(path.name + ".tmp"), None, 0, time.perf_counter()
    with tqdm(total=rows, unit=unit, desc=f"extract {name}", disable=quiet) as bar:
        for chunk in chunks:
            chunk = chunk.reshape(len(chunk), -1)  # rows of any shape (a trunk's map, token states), stored flat
            if out is None:  # F is known from the first chunk
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, chunk.shape[1]))
            out[row:row + len(chunk)] = chunk.float().cpu().numpy()
            row += len(chunk)
            bar.update(len(chunk))
    if row != rows:
        raise RuntimeError(f"extraction of {name} gave {row} rows, expected {rows}")
    out.flush()
    shape = out.shape
    del out
    os.replace(tmp, path)
    atomic_write_json({"key": key, "shape": list(shape), "dtype": "float32", "sha256": _file_sha256(path)},
                      meta)  # last: marks it complete
    seconds = time.perf_counter() - tic
    if not quiet:
        print(f"extracted {name}: {rows:,} {unit} in {seconds:.1f} s ({rows / seconds:.0f} {unit}/s)")
    return np.load(path, mmap_mode="r")  # just written and hashed: `_open`'s checks would read it again


def _open(path: Path, meta: Path, key: dict, rows: int) -> np.ndarray:
    """Memory-map a finished cache file after checking its key, shape, size and content: the sha256
    in its `.json` (a same-shape file of another split or shard, copied over it, is refused). Hashing
    reads the file once per open (about a second per GB); a `.json` from before content hashes gets
    the file's hash recorded on its first open."""
    fix = f"delete {path} and {meta.name} to rebuild it"
    try:
        stored = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise FeatureCacheError(f"feature cache {meta} is corrupt ({e}); {fix}") from e
    if stored.get("key") != key:
        theirs = stored.get("key") or {}
        differ = sorted(k for k in key.keys() | theirs.keys() if key.get(k) != theirs.get(k))
        raise FeatureCacheError(f"feature cache {path} was made for other settings (its key differs in {differ}); {fix}")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # numpy: "mmap length is greater than file size" when truncated
        raise FeatureCacheError(f"feature cache {path} is truncated or corrupt ({e}); {fix}") from e
    if array.ndim != 2 or len(array) != rows or array.dtype != np.float32 or list(array.shape) != stored.get("shape"):
        raise FeatureCacheError(f"feature cache {path} holds {array.dtype} {array.shape}, expected float32 "
                                f"({rows}, F) as its .json says ({stored.get('shape')}); {fix}")
    digest = _file_sha256(path)
    if "sha256" not in stored:
        with suppress(OSError):  # a read-only shared cache: checked by shape only, as before hashes
            atomic_write_json({**stored, "sha256": digest}, meta)
    elif stored["sha256"] != digest:
        raise FeatureCacheError(f"feature cache {path} is not the file its {meta.name} describes (its sha256 "
                                f"differs: replaced or changed after it was written); {fix}")
    return array


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
