"""The study's CLI: run a preset's grid (resumable) and write its report.

    python -m pdclip.study --preset quick --out runs/study-quick --results docs/results.md
    python -m pdclip.study --preset full --out runs/study --jobs 2 --results docs/results.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pdclip.study.presets import PRESETS, expand, select
from pdclip.study.report import write_report
from pdclip.study.runner import run_grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdclip.study",
                                description="Run the reproduction study (resumable) and write its report.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", default=None, help="the study folder (default: runs/study-<preset>)")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs, one thread each")
    p.add_argument("--results", default=None, help="write the markdown report here (e.g. docs/results.md)")
    p.add_argument("--figures", default="docs/figures", help="where the report's PNG figures go")
    p.add_argument("--report-only", action="store_true", help="skip training; report what is done")
    p.add_argument("--only", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="run only matching cells, e.g. --only experiment=noise noise=0.4 (the report covers all)")
    args = p.parse_args(argv)
    preset, out = PRESETS[args.preset], Path(args.out or f"runs/study-{args.preset}")
    if not args.report_only:
        run_grid(select(expand(preset), args.only), preset["base"], out, jobs=args.jobs)
    if args.results:
        write_report(args.preset, out, Path(args.results), Path(args.figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
