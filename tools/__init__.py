"""Repository tooling, not part of the `pdclip` library: run from the repository root.

`python -m tools.tutorial` runs every notebook for `make tutorial` (memory, time, `outputs/summary.md`);
`python -m tools.render outputs` renders executed notebooks as self-contained HTML pages + `index.html`.
"""
