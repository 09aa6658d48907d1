"""The command line of `python -m pdclip.train`: `--field=value` options into a `TrainConfig`, and `--help`.

`parse_cli` reads `--config NAME_OR_PATH` (`pdclip.config.load_config`) and the overrides, which
`TrainConfig.with_overrides` checks and converts; `cli_help` lists every field with the description
written beside its default in `pdclip/config.py` (`field_docs`), its default and its choices.
This module imports `pdclip.config`, never the reverse: the configuration stays plain data.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import re
import textwrap
import tokenize
from dataclasses import MISSING, fields
from typing import get_args, get_origin, get_type_hints

from pdclip.config import CHOICES, CONFIG_DIR, LossConfig, TrainConfig, load_config


def parse_cli(argv: list[str]) -> TrainConfig:
    """`--config NAME_OR_PATH` then `--field=value` / `--field value` / `--flag` overrides."""
    overrides, config, i = {}, None, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --field=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:  # "--field value", or a bare "--flag" meaning true
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value, i = (argv[i + 1], i + 1) if has_value else ("true", i)
        name = name.replace("-", "_")
        if name == "config":
            config = value
        else:
            overrides[name] = value
        i += 1
    cfg = TrainConfig() if config is None else load_config(config)
    new_dataset = overrides.get("dataset", cfg.dataset)
    if config is not None and new_dataset != cfg.dataset and cfg.data_kwargs and "data_kwargs" not in overrides:
        raise ValueError(f"--dataset {new_dataset}: --config {config} sets data_kwargs {cfg.data_kwargs} for its "
                         f"dataset {cfg.dataset}; give this one's too, e.g. --data-kwargs '{{}}'")
    return cfg.with_overrides(overrides)


USAGE = """usage: python -m pdclip.train [-h] [--config NAME_OR_PATH] [--FIELD=VALUE ...]
       torchrun --nproc_per_node=N -m pdclip.train [...]

Train one run. Every option is a field of TrainConfig or LossConfig (pdclip/config.py): --field=value,
--field value, or a bare --flag (= true); "-" and "_" are the same. Options override --config.

  -h, --help              show this message and exit
  --config NAME_OR_PATH   a JSON file of TrainConfig fields, or a shipped recipe: {shipped}"""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: its trailing `# comment`, else the comment lines just above it.

    Read from the class's source with `tokenize` (a `#` inside a string is not a comment), so the
    comments beside the defaults stay the one place a field is described.
    """
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    comments = {}  # row (0-based) -> (comment text, whether code precedes it on the row)
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start[0] - 1, tok.start[1]
            comments[row] = (tok.string.lstrip("#").strip(), bool(lines[row][:col].strip()))
    names, docs = {f.name for f in fields(cls)}, {}
    for row, line in enumerate(lines):
        match = re.match(r"    (\w+)\s*:", line)
        if not match or match.group(1) not in names:
            continue
        text, trailing = comments.get(row, ("", False))
        if not trailing:  # the block of comment-only rows right above the field
            above = row - 1
            while above in comments and not comments[above][1]:
                above -= 1
            text = " ".join(comments[r][0] for r in range(above + 1, row))
        docs[match.group(1)] = " ".join(text.split())
    return docs


def cli_help() -> str:
    """The `--help` text of `python -m pdclip.train`: every field with its description, default and choices."""
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    out = [USAGE.format(shipped=shipped)]
    for cls, title in ((TrainConfig, "training (TrainConfig)"), (LossConfig, "method (LossConfig; also --loss.FIELD)")):
        out.append(f"\n{title}:")
        docs, hints = field_docs(cls), get_type_hints(cls)
        for f in fields(cls):
            if f.name == "loss":  # its fields are listed as options of their own
                continue
            default = f.default_factory() if f.default is MISSING else f.default
            notes = ([f"choices: {', '.join(CHOICES[f.name])}"] if f.name in CHOICES else []) + [
                f"default: {json.dumps(default) if isinstance(default, (dict, tuple)) else default}"]
            option = f"  --{f.name.replace('_', '-')} {_metavar(hints[f.name])}"
            body = f"{docs.get(f.name, '')} ({'; '.join(notes)})"
            wrapped = textwrap.wrap(body, 110, initial_indent=" " * 26, subsequent_indent=" " * 26)
            if len(option) < 25:
                wrapped[0] = option.ljust(26) + wrapped[0][26:]
            else:
                wrapped.insert(0, option)
            out += wrapped
    return "\n".join(out)


def _metavar(hint: object) -> str:
    """How an option's value is written: `INT`, `FLOAT|none`, `JSON` (dicts, lists), `[BOOL]` (bare = true)."""
    optional = type(None) in get_args(hint)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    base = get_origin(base) or base
    name = {bool: "[BOOL]", dict: "JSON", tuple: "JSON", list: "JSON"}.get(base, getattr(base, "__name__", "X").upper())
    return name + ("|none" if optional else "")
