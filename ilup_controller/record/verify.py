"""``ilup verify RECORD [--json]``: check a procedure record's hash chain (record/chain.py).

Exit 0: intact (sealed, or unsealed after a crash: intact up to its last commit); 5: tampered
or damaged, the first bad row named; 1: not verifiable (no chain: a format-1 record; not a
readable record)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ilup_controller.exitcodes import ExitCode
from ilup_controller.record.chain import Verification, verify_record
from ilup_controller.record.commands import add_verify_arguments

SHOWN_FINDINGS = 20


def format_text(v: Verification) -> str:
    lines = [f"{v.path}: {v.summary()}"]
    for f in v.findings[:SHOWN_FINDINGS]:
        lines.append(f"  {f.text()}")
    if len(v.findings) > SHOWN_FINDINGS:
        lines.append(f"  ... and {len(v.findings) - SHOWN_FINDINGS} more")
    if v.rows:
        rate = v.rows_checked / v.seconds if v.seconds > 0 else 0.0
        lines.append(f"  {v.rows_checked} rows checked in {v.seconds:.2f} s ({rate:.0f} rows/s)")
    return "\n".join(lines)


def run_verify(args: argparse.Namespace) -> int:
    """Verify each RECORD; the exit status is the worst of them (5 over 1 over 0)."""
    results = [verify_record(path) for path in args.record]
    if args.json:
        out = [v.as_json() for v in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        for v in results:
            print(format_text(v), file=sys.stdout if v.exit_code == 0 else sys.stderr)
    codes = {v.exit_code for v in results}
    return ExitCode.REJECTED if ExitCode.REJECTED in codes else max(codes)


def main_verify(argv: Sequence[str] | None = None) -> int:
    ap = add_verify_arguments(argparse.ArgumentParser(prog="ilup verify", description=__doc__))
    return run_verify(ap.parse_args(argv))
