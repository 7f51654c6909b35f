"""``ilup export RECORD --csv``: the samples table as CSV (NULL, a missing reading, as empty)."""

from __future__ import annotations

import argparse
import csv
import sqlite3
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ilup_controller.config.resolution import at_resolution, recorded_decimals
from ilup_controller.exitcodes import ExitCode
from ilup_controller.record.commands import add_export_arguments
from ilup_controller.record.store import SAMPLE_COLUMNS, RecordError, connect_read


def export_csv(record_path: str | Path, out: str | Path | TextIO) -> int:
    """Write the samples of ``record_path`` as CSV to ``out`` (a path or an open text file);
    returns the number of data rows written. The header is the samples column names."""
    p = Path(record_path)
    conn = connect_read(p)
    try:
        check = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            raise RecordError(f"{p}: integrity check failed: {'; '.join(check)}")
        meta = conn.execute("SELECT value FROM meta WHERE key = 'config_json'").fetchone()
        decimals = recorded_decimals(meta[0] if meta else None)
        rows = conn.execute(f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM samples ORDER BY seq")
        if not isinstance(out, str | Path):
            return _write(out, rows, decimals)
        with open(out, "w", newline="", encoding="utf-8") as f:
            return _write(f, rows, decimals)
    except sqlite3.Error as e:
        raise RecordError(f"{p}: cannot read samples: {e}") from e
    finally:
        conn.close()


def _write(f: TextIO, rows: Iterable[tuple[Any, ...]], decimals: Mapping[str, int]) -> int:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(SAMPLE_COLUMNS)
    n = 0
    for row in rows:
        # Floats at their signal's resolution (records from before the state was rounded carry
        # float noise); None (a missing reading) becomes an empty field.
        w.writerow(
            [
                "" if v is None else repr(at_resolution(v, c, decimals)) if isinstance(v, float)
                else v
                for c, v in zip(SAMPLE_COLUMNS, row, strict=True)
            ]
        )  # fmt: skip
        n += 1
    return n


def run_export(args: argparse.Namespace) -> int:
    """``ilup export RECORD --csv [-o OUT]`` (OUT ``-``: standard output); exit status."""
    out: str = args.output or str(args.record.with_suffix(".csv"))
    try:
        n = export_csv(args.record, sys.stdout if out == "-" else out)
    except (RecordError, OSError) as e:
        print(f"ilup export: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    if out != "-":
        print(f"{out}: {n} samples", file=sys.stderr)
    return ExitCode.OK


def main_export(argv: Sequence[str] | None = None) -> int:
    ap = add_export_arguments(argparse.ArgumentParser(prog="ilup export", description=__doc__))
    return run_export(ap.parse_args(argv))
