"""Extract the frozen towers' features that notebooks 06-08 read, so their first run on Binder trains
at once instead of spending minutes in EfficientNet-Lite0 (`binder/postBuild` runs this).

The data keywords come from each notebook's parameters cell, so this script and the notebooks cannot
drift apart; the towers are the shipped `frozen_cpu` configuration's, as in the notebooks.

    python binder/warm_feature_cache.py                      # what postBuild runs
    python binder/warm_feature_cache.py --only 07 --data '{"n_train": 64, "n_eval": 32}' --root /tmp/c
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# notebook prefix -> (dataset, the parameters-cell variable holding its keywords, the splits it reads)
READS = {
    "06": ("clipart", "clipart", ("train", "test")),
    "07": ("synthetic", "data", ("train",)),
    "08": ("synthetic", "data", ("train", "val", "test", "shift")),
}


def parameters(prefix: str) -> dict:
    """The literal assignments of a notebook's cell tagged `parameters`."""
    import nbformat

    (path,) = NOTEBOOK_DIR.glob(f"{prefix}_*.ipynb")
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {node.target.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.AnnAssign) and node.value is not None}


def plan(prefixes: list[str], data: dict | None = None) -> dict[tuple[str, str], set[str]]:
    """`{(dataset, keywords as JSON): splits}` over the notebooks, duplicates merged (07 and 08 share)."""
    reads: dict[tuple[str, str], set[str]] = {}
    for prefix in prefixes:
        dataset, variable, splits = READS[prefix]
        kwargs = parameters(prefix)[variable] if data is None else data
        reads.setdefault((dataset, json.dumps(kwargs, sort_keys=True)), set()).update(splits)
    return reads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(READS), help="notebook prefixes, e.g. 06")
    parser.add_argument("--data", type=json.loads, default=None, help="JSON keywords instead of the notebooks'")
    parser.add_argument("--root", default=None, help="cache folder (default: pdclip's, as the notebooks use)")
    args = parser.parse_args(argv)

    from pdclip.config import load_config
    from pdclip.features import CachedFeatures
    from pdclip.models import model_from_config

    model = model_from_config(load_config("frozen_cpu")).eval()
    for (dataset, kwargs), splits in plan(args.only, args.data).items():
        for split in sorted(splits):
            CachedFeatures(model, dataset, split, json.loads(kwargs), root=args.root)


if __name__ == "__main__":
    main()
