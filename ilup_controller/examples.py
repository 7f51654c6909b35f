"""The example configurations (cart files, scenarios, Mosquitto) that ship with the package.

`config/` in the repository is their one source. A wheel carries a copy in
``ilup_controller/data/`` (setup.py copies it at build time); a source checkout or an editable
install reads `config/` itself.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

SIM_CONFIG = "sim.yaml"
CART_EXAMPLE = "cart.example.yaml"


def config_dir() -> Path:
    """The directory holding sim.yaml, cart.example.yaml, scenarios/ and mosquitto/."""
    packaged = _PACKAGE / "data"
    if (packaged / SIM_CONFIG).is_file():
        return packaged
    return _PACKAGE.parent / "config"


def example(name: str) -> Path:
    return config_dir() / name


def scenario_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "scenarios").glob("*.yaml"))


def resolve_scenario(text: str) -> Path:
    """A scenario file path as given, or the name of a packaged scenario (``leak``)."""
    given = Path(text)
    if given.exists() or given.suffix:
        return given
    packaged = config_dir() / "scenarios" / f"{text}.yaml"
    return packaged if packaged.is_file() else given


INIT_HEADER = (
    "# Written by `ilup init` from the packaged {source}.\n"
    "# Edit it, then check it with `ilup check-config -c {dest}` until it says ok.\n"
    "#\n"
)


def write_starter(dest: Path, *, simulated: bool, force: bool) -> Path:
    """Write a commented cart file to start from; refuses to overwrite unless ``force``."""
    source = example(SIM_CONFIG if simulated else CART_EXAMPLE)
    if dest.exists() and not force:
        raise FileExistsError(f"{dest}: exists; pass --force to overwrite it")
    text = INIT_HEADER.format(source=source.name, dest=dest) + source.read_text(encoding="utf-8")
    dest.write_text(text, encoding="utf-8")
    return dest
