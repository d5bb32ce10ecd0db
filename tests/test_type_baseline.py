"""pyproject's [tool.mypy]: `.ci/run` type-checks every package of the tree but tests/, and
no module is excused (the baseline of issue 23 item 9 is empty: keep it so)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mypy_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]


def test_no_module_is_excused_from_mypy():
    excused = [override["module"] for override in mypy_config().get("overrides", [])
               if override.get("ignore_errors")]
    assert not excused, f"[tool.mypy] excuses {excused}: make them clean instead"


def test_mypy_checks_every_package_of_the_tree():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "tests"
                and any(p.glob("*.py"))}
    assert packages <= set(mypy_config()["files"]), packages
