"""The study folder: `<out>/base.json` (the shared settings its cells were run with) and
`<out>/cells/<cell id>/result.json` (one per finished cell; `pdclip.study.runner` writes them)."""

from __future__ import annotations

import json
from pathlib import Path


def check_base(out: Path, base: dict) -> None:
    """Record the shared settings in `<out>/base.json`; refuse to mix results made with other ones
    (cell ids name only what varies, so stale cells would otherwise be skipped as done)."""
    path = out / "base.json"
    if path.exists() and json.loads(path.read_text()) != base:
        raise ValueError(f"{out} holds results made with other shared settings ({path}); "
                         f"use a new --out or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base, indent=1))


def load_results(out: str | Path, cells: list[dict] | None = None) -> list[dict]:
    """The results under `<out>/cells` (only those of `cells` when given, in their order).

    With `cells`, each result is filed under the cell's experiments as the preset defines them now: an
    experiment added later (an ablation whose default arm was run by another experiment) includes it.
    """
    if cells is None:
        return [json.loads(p.read_text()) for p in sorted(Path(out, "cells").glob("*/result.json"))]
    rows = []
    for cell in cells:
        path = Path(out, "cells", cell["id"], "result.json")
        if path.exists():
            row = json.loads(path.read_text())
            row["cell"]["experiments"] = cell["experiments"]
            rows.append(row)
    return rows
