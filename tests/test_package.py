"""The installable package: the wheel carries its example configurations, and the installed
`ilup` runs its simulator from an empty directory (real build, real venv, real processes).
Also `make test`'s system-package check, which stops at once with the one command to run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from test_demo import demo_in_a_terminal

from ilup_controller import examples
from ilup_controller.broker import MosquittoProcess, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SHIPPED = (
    "sim.yaml",
    "cart.example.yaml",
    "mosquitto/mosquitto.conf",
    "mosquitto/acl",
    *(f"scenarios/{p.name}" for p in sorted((REPO / "config" / "scenarios").glob("*.yaml"))),
)


def run(args: list[str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the wheel, the build's verbose output). Built offline with the test venv's setuptools."""
    out = tmp_path_factory.mktemp("dist")
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(out),
        ],
        cwd=out,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (whl,) = out.glob("ilup_controller-*.whl")
    return whl, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(wheel: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the wheel; the dependencies come from the test venv
    through a .pth line (offline, and the wheel's own files win: they are first on sys.path)."""
    venv = tmp_path_factory.mktemp("venv")
    done = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    assert done.returncode == 0, done.stderr
    site = Path(
        run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            cwd=venv,
        ).stdout.strip()
    )
    (site / "test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel[0]),
        ],
        cwd=venv,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


def test_wheel_ships_the_example_configurations_and_builds_without_warnings(
    wheel: tuple[Path, str],
) -> None:
    whl, log = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    missing = [n for n in SHIPPED if f"ilup_controller/data/{n}" not in names]
    assert missing == []
    for name in SHIPPED:
        assert (
            zipfile.ZipFile(whl).read(f"ilup_controller/data/{name}")
            == (REPO / "config" / name).read_bytes()
        ), name
    metadata = (
        zipfile.ZipFile(whl)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    assert "License-Expression: LicenseRef-Proprietary" in metadata
    assert "deprecat" not in log.lower(), [x for x in log.splitlines() if "eprecat" in x]


def test_installed_ilup_runs_its_simulator_from_an_empty_directory(
    installed: Path, tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    ilup = str(installed / "ilup")
    for sub in ("demo", "sim", "init", "report", "export", "check-config", "status", "set"):
        done = run([ilup, sub, "--help"], cwd=empty, timeout_s=60)
        assert done.returncode == 0, f"{sub}: {done.stderr}"
    # The default cart file of `ilup sim` and `ilup demo` is the packaged one, inside the venv.
    code = (
        "from ilup_controller.cli import build_parser as b; "
        "print(b().parse_args(['sim']).config); print(b().parse_args(['demo']).config)"
    )
    defaults = run([str(installed / "python"), "-c", code], cwd=empty).stdout.split()
    assert len(defaults) == 2, defaults
    assert defaults[0] == defaults[1], defaults
    packaged = Path(defaults[0])
    assert packaged.is_relative_to(installed.parent), packaged
    assert packaged.is_file(), packaged
    assert packaged.read_bytes() == (REPO / "config" / "sim.yaml").read_bytes()
    done = run([ilup, "check-config", "-c", str(packaged)], cwd=empty, timeout_s=60)
    assert done.returncode == 0, done.stderr
    assert "cart_id=sim_cart_1, 3 devices" in done.stdout

    done = run([ilup, "init", "--sim", "cart.yaml"], cwd=empty, timeout_s=60)
    assert done.returncode == 0, done.stderr
    text = (empty / "cart.yaml").read_text()
    assert text.startswith("# Written by `ilup init`")
    assert "register maps live here" in text.lower()
    again = run([ilup, "init", "--sim", "cart.yaml"], cwd=empty, timeout_s=60)
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert (empty / "cart.yaml").read_text() == text  # not overwritten

    # Free ports instead of the packaged fixed ones (tests never take fixed ports).
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(text)
    ports = {name: free_port() for name in data["devices"]}
    for name, dev in data["devices"].items():
        dev["port"] = ports[name]
    data["mqtt"]["port"] = mosquitto.port
    with (empty / "cart.yaml").open("w") as f:
        yaml.dump(data, f)
    log = (tmp_path / "sim.log").open("wb")
    sim = subprocess.Popen(
        [ilup, "sim", "-c", "cart.yaml", "--scenario", "leak"],  # a packaged scenario by name
        cwd=empty,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": ""},
    )
    try:
        deadline = time.monotonic() + 30
        listening: set[str] = set()
        while listening != set(ports) and time.monotonic() < deadline:
            assert sim.poll() is None, (tmp_path / "sim.log").read_text()
            for name, port in ports.items():
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        listening.add(name)
            time.sleep(0.1)
        assert listening == set(ports), (tmp_path / "sim.log").read_text()
        # The installed copy runs, not the checkout.
        where = run(
            [
                str(installed / "python"),
                "-c",
                "import ilup_controller; print(ilup_controller.__file__)",
            ],
            cwd=empty,
        ).stdout
        assert str(installed.parent) in where, where
    finally:
        sim.send_signal(signal.SIGTERM)
        rc = sim.wait(15)
        log.close()
    assert rc == 0, (tmp_path / "sim.log").read_text()
    assert os.listdir(empty) == ["cart.yaml"]  # nothing else written to the working directory


def test_checkout_reads_config_from_the_repository() -> None:
    # An editable install and a checkout read config/ itself: the one source.
    assert examples.config_dir() == REPO / "config"
    assert examples.resolve_scenario("leak") == REPO / "config" / "scenarios" / "leak.yaml"
    assert examples.resolve_scenario("my/own.yaml") == Path("my/own.yaml")


def test_missing_system_packages_stop_make_test_at_once_with_the_command(tmp_path: Path) -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:  # as root the script installs; check the non-root path
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    start = time.monotonic()
    done = subprocess.run(
        [
            *prefix,
            "env",
            f"CHROMIUM={tmp_path / 'no-chromium'}",
            str(REPO / "scripts/system-deps.sh"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    took_s = time.monotonic() - start
    assert done.returncode == 1
    assert "sudo apt-get install -y chromium chromium-driver" in done.stderr
    assert took_s < 5.0
    makefile = (REPO / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert test_recipe.index("scripts/system-deps.sh") < test_recipe.index("pytest")
    assert "scripts/system-deps.sh" in (REPO / ".ci" / "run").read_text()


def test_installed_demo_runs_from_an_empty_directory(
    installed: Path, tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    """The wheel's own `ilup demo` in a terminal, from an empty directory: simulator, daemon
    and live view come up with live values, and Ctrl-C stops them in order."""
    empty = tmp_path / "empty"
    empty.mkdir()
    ilup = str(installed / "ilup")
    done = run([ilup, "init", "--sim", "cart.yaml"], cwd=empty, timeout_s=60)
    assert done.returncode == 0, done.stderr
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load((empty / "cart.yaml").read_text())
    for dev in data["devices"].values():  # free ports: tests never take the fixed ones
        dev["port"] = free_port()
    data["mqtt"].update({"host": "127.0.0.1", "port": mosquitto.port})
    with (empty / "cart.yaml").open("w") as f:
        yaml.dump(data, f)
    demo_in_a_terminal([ilup, "demo", "-c", "cart.yaml"], empty, timeout_s=20.0)
