"""The study folder: `<out>/base.json` (the shared settings its cells were run with),
`<out>/cells/<cell id>/result.json` (one per finished cell; `pdclip.study.runner` writes them) and
`<out>/reference/<name>.json` (the raw backbone's linear probe, `runner.reference_probes`)."""

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
        return [_upgrade(json.loads(p.read_text())) for p in sorted(Path(out, "cells").glob("*/result.json"))]
    rows = []
    for cell in cells:
        path = Path(out, "cells", cell["id"], "result.json")
        if path.exists():
            row = _upgrade(json.loads(path.read_text()))
            row["cell"]["experiments"] = cell["experiments"]
            rows.append(row)
    return rows


def _upgrade(row: dict) -> dict:
    """A result written before budgets were chosen on validation (its one `metrics`, at the last step)."""
    if "budgets" not in row:
        row["budgets"] = {"final": {"step": None, "metrics": row.pop("metrics"), "samples": {}}}
        row["probe_budget"] = "final"
    return row


def scores(row: dict, budget: str = "zeroshot") -> dict[str, float]:
    """A result's metrics at one of its evaluations: "final" (the last step), "zeroshot" or "retrieval"
    (the steps chosen on validation for them); runs without a selection have only "final"."""
    return row["budgets"][budget if budget in row["budgets"] else "final"]["metrics"]


def load_references(out: str | Path) -> dict[tuple[str, int | None], float]:
    """`{(dataset, n_train): test accuracy}` of the raw-backbone linear probes under `<out>/reference`."""
    refs = {}
    for path in sorted(Path(out, "reference").glob("*.json")):
        dataset, _, size = path.stem.partition("-n")
        refs[(dataset, int(size) if size else None)] = json.loads(path.read_text())["acc"]
    return refs
