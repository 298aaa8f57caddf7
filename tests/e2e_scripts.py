"""Import the example scripts as modules (they live outside the package), so tests call their `main(argv)`."""

from pathlib import Path

from trl_icd.cli import load_script as load_script_file

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """`examples/<name>.py` as a module."""
    return load_script_file(ROOT / "examples" / f"{name}.py")
