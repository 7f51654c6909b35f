"""Arguments of `ilup report`, `ilup export` and `ilup verify`, kept apart from report.py so
that building the `ilup` parser (for every subcommand, the daemon too) does not import
matplotlib and numpy: a larger heap makes the daemon's garbage collections, and so its ticks,
slower."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_report_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("record", type=Path, help="record file (.sqlite)")
    ap.add_argument("-o", "--output", type=Path, help="HTML file (default: RECORD.html)")
    ap.add_argument(
        "--png-dir", type=Path, help="directory of the PNG figures (default: OUT-figures)"
    )
    ap.set_defaults(func=run_report)
    return ap


def add_export_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("record", type=Path, help="record file (.sqlite)")
    ap.add_argument("--csv", action="store_true", required=True, help="export the samples as CSV")
    ap.add_argument("-o", "--output", help="CSV file (default: RECORD.csv; '-': stdout)")
    ap.set_defaults(func=run_export)
    return ap


def add_verify_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("record", type=Path, nargs="+", help="record file(s) (.sqlite)")
    ap.add_argument("--json", action="store_true", help="the result as JSON")
    ap.set_defaults(func=run_verify)
    return ap


def run_report(args: argparse.Namespace) -> int:
    from ilup_controller.record.report import run_report as run

    return run(args)


def run_export(args: argparse.Namespace) -> int:
    from ilup_controller.record.export import run_export as run

    return run(args)


def run_verify(args: argparse.Namespace) -> int:
    from ilup_controller.record.verify import run_verify as run

    return run(args)
