"""Regenerate the config docs from the schema: pyproject's app config and docs/config.md's table.

    python scripts/sync_config.py          # rewrite both
    python scripts/sync_config.py --check  # exit 1 if either is out of date

`tests/test_config.py` runs the check, so a key added to the schema without running
this script fails CI.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fl_app.app.config import all_settings, defaults  # noqa: E402
from scripts.bench.results_page import markers, with_section  # noqa: E402

TABLE = "config-table"  # docs/config.md's section, between <!-- config-table:start/end -->


def pyproject_text(current: str) -> str:
    """pyproject.toml with `[tool.flwr.app.config]` holding every key and its default."""
    block = "[tool.flwr.app.config]\n" + tomli_w.dumps(defaults())
    return re.sub(r"\[tool\.flwr\.app\.config\]\n(?:[A-Za-z0-9_\"-][^\n]*\n)*", block, current,
                  count=1)


def config_table() -> str:
    """Markdown table of every run-config key."""
    rows = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for setting in all_settings().values():
        default = tomli_w.dumps({"v": setting.default}).strip()[4:]
        allowed = setting.describe_range().replace("|", "\\|")
        rows.append(f"| `{setting.key}` | {setting.type.__name__} | `{default}` | {allowed} | "
                    f"{setting.help} |")
    return "\n".join(rows)


def reference_text(current: str) -> str:
    """docs/config.md with the config table between its markers replaced."""
    start, _ = markers(TABLE)
    if start not in current:
        raise SystemExit(f"docs/config.md lacks the marker {start}")
    return with_section(current, TABLE, config_table(), ROOT / "docs" / "config.md")


def main() -> int:
    """Rewrite (or with --check, verify) pyproject.toml and docs/config.md."""
    unknown = [arg for arg in sys.argv[1:] if arg != "--check"]
    if unknown:  # --help included: nothing is rewritten on a mistyped call
        print(f"usage: {Path(sys.argv[0]).name} [--check]  (rewrite pyproject.toml and "
              f"docs/config.md's config sections, or only verify them); unknown: "
              f"{' '.join(unknown)}",
              file=sys.stderr)
        return 2
    check = "--check" in sys.argv[1:]
    stale = []
    for name, render in (("pyproject.toml", pyproject_text), ("docs/config.md", reference_text)):
        path = ROOT / name
        current = path.read_text(encoding="utf-8")
        wanted = render(current)
        if wanted != current:
            stale.append(name)
            if not check:
                path.write_text(wanted, encoding="utf-8")
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/sync_config.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
