"""Command line for the documents generated from the models (docs/*.md, docs/asyncapi.yaml):
write the file, or with ``--check`` fail when the committed file is out of date."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def generated_doc_main(
    argv: Sequence[str] | None,
    *,
    description: str,
    default_path: Path,
    render: Callable[[], str],
    command: str,
) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--output", type=Path, default=default_path, help=f"default: {default_path}"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")
    args = parser.parse_args(argv)
    text = render()
    path: Path = args.output
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            print(f"{path} is out of date: run `{command}`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0
