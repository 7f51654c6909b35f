"""The `ilup` command line without a broker: --help on every subcommand, -c everywhere a cart
file is read, the exit code table in the README, `ilup init` and the bash completion."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ilup_controller.cli import build_parser, main
from ilup_controller.exitcodes import MEANING, ExitCode, markdown_table

REPO = Path(__file__).resolve().parent.parent


def _subcommands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("sub", _subcommands())
def test_every_subcommand_prints_its_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `ilup report --help` and `ilup export --help` exited 2, unrecognized arguments."""
    with pytest.raises(SystemExit) as done:
        main([sub, "--help"])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err
    assert out.out.startswith(f"usage: ilup {sub}")


def test_report_and_export_help_name_their_options(capsys: pytest.CaptureFixture[str]) -> None:
    for sub, option in (("report", "--png-dir"), ("export", "--csv")):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert option in capsys.readouterr().out


def test_check_config_takes_c_and_the_positional_form(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `ilup check-config -c FILE` was rejected (exit 2)."""
    assert main(["check-config", "-c", "config/sim.yaml"]) == ExitCode.OK
    assert main(["check-config", "config/sim.yaml"]) == ExitCode.OK
    assert capsys.readouterr().out.count("config/sim.yaml: ok (cart_id=sim_cart_1") == 2
    for args in ([], ["config/sim.yaml", "-c", "config/sim.yaml"]):
        with pytest.raises(SystemExit) as done:
            main(["check-config", *args])
        assert done.value.code == ExitCode.USAGE


def test_config_errors_and_usage_errors_have_distinct_exit_codes(tmp_path: Path) -> None:
    """Before: a usage error, a config error and a rejected command all exited 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("cart_id: x\n")
    assert main(["check-config", "-c", str(bad)]) == ExitCode.CONFIG == 4
    with pytest.raises(SystemExit) as done:
        main(["check-config", "-c", str(bad), "--no-such-flag"])
    assert done.value.code == ExitCode.USAGE == 2
    assert len({int(c) for c in ExitCode}) == len(ExitCode) == len(MEANING)


def test_readme_shows_the_exit_code_table_generated_from_the_enum() -> None:
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- exit-codes[^>]*-->\n(.*?)<!-- /exit-codes -->", readme, re.S)
    assert found is not None
    assert found.group(1) == markdown_table()
    assert "| 6 | `offline` |" in found.group(1)


def test_init_writes_a_commented_cart_file_and_will_not_overwrite(tmp_path: Path) -> None:
    real, sim = tmp_path / "cart.yaml", tmp_path / "sim.yaml"
    assert main(["init", str(real)]) == ExitCode.OK
    assert main(["init", "--sim", str(sim)]) == ExitCode.OK
    assert "simulated: false" in real.read_text()
    assert "simulated: true" in sim.read_text()
    assert real.read_text().count("#") > 30  # the template's comments come along
    assert main(["check-config", "-c", str(sim)]) == ExitCode.OK
    real.write_text("mine\n")
    assert main(["init", str(real)]) == ExitCode.FAILURE
    assert real.read_text() == "mine\n"
    assert main(["init", "--force", str(real)]) == ExitCode.OK
    assert "simulated: false" in real.read_text()


def _complete(script: Path, *words: str) -> list[str]:
    """What bash's completion function offers for the command line ``words`` (last: partial)."""
    line = " ".join(f"'{w}'" for w in words)
    done = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _ilup; "
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
        cwd=script.parent,
    )
    return sorted(x for x in done.stdout.splitlines() if x)


def test_bash_completion_completes_commands_flags_and_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["completion", "bash"]) == ExitCode.OK
    script = tmp_path / "ilup.bash"
    script.write_text(capsys.readouterr().out)
    (tmp_path / "cart.yaml").write_text("")
    assert _complete(script, "ilup", "re") == ["report", "reset"]
    assert _complete(script, "ilup", "tune", "--loop", "") == [
        "flow", "perfusate", "pressure", "water"
    ]  # fmt: skip
    assert _complete(script, "ilup", "status", "-c", "ca") == ["cart.yaml"]
    assert "--png-dir" in _complete(script, "ilup", "report", "--p")
    assert _complete(script, "ilup", "--log-level", "debug", "che") == ["check-config"]
    assert _complete(script, "ilup", "sim", "--speed", "") == []  # a number: nothing to offer


def test_building_the_parser_leaves_matplotlib_unimported() -> None:
    """The daemon parses its arguments with this parser: matplotlib and numpy in its heap made
    its garbage collections slow enough to overrun ticks under a command flood."""
    code = (
        "import sys; from ilup_controller.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('matplotlib', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"
