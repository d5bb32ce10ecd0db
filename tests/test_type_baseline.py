"""pyproject's [tool.mypy] baseline: the modules it excuses exist (a renamed or deleted module
must leave the list, not linger in it), and none of its own files is excused twice."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def excused_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    return [module for override in config["overrides"] if override.get("ignore_errors")
            for module in override["module"]]


def test_every_excused_module_exists_once():
    modules = excused_modules()
    assert len(modules) == len(set(modules))
    missing = [m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    assert not missing, f"[tool.mypy] excuses modules that do not exist: {missing}"


def test_the_new_layers_are_not_excused():
    modules = excused_modules()
    for prefix in ("fl_app.protocol", "strategies.spec", "strategies.combinations",
                   "strategies.wire_meter", "scripts.bench.results_page"):
        assert not any(m.startswith(prefix) for m in modules), prefix
