"""docs/results.md's strategy table: the script's own output, measured with today's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_app.app.config import defaults
from scripts.bench import strategies as strategy_table
from scripts.bench.results_page import markers, read_section
from scripts.bench.strategies import Result
from strategies import flower_builtins
from strategies.registry import strategy_names

ROOT = Path(__file__).resolve().parent.parent


def section(readme: Path) -> str:
    """What lies between the strategy-table markers."""
    return read_section(strategy_table.SECTION, readme) or ""


def parse(text: str) -> tuple[dict[str, Result], int, int]:
    """The results, rounds and minutes a table section states."""
    return strategy_table.parse_table(text)


def test_readme_table_is_the_scripts_output_for_every_strategy():
    text = section(ROOT / "docs" / "results.md")
    results, rounds, minutes = parse(text)
    assert list(results) == [strategy_table.BASELINE,
                             *(n for n in strategy_names() if n != strategy_table.BASELINE)]
    assert rounds == defaults()["num-server-rounds"]
    # rendering the figures it states gives back the whole section, character for character
    assert strategy_table.markdown(results, rounds, 10, minutes) == text


def test_readme_table_was_measured_with_the_current_defaults():
    stated = strategy_table.FINGERPRINT.search(section(ROOT / "docs" / "results.md"))
    assert stated, "the README's strategy table names no defaults fingerprint"
    assert stated[1] == strategy_table.defaults_fingerprint(), (
        "a default that shapes the strategy table changed since it was measured: rerun "
        "python -m scripts.bench.strategies")


def test_fingerprint_follows_every_strategy_and_training_default(monkeypatch):
    before = strategy_table.defaults_fingerprint()
    for key in ("fedopt-eta", "noise-multiplier", "local-epochs", "partitioner"):
        assert key in strategy_table.result_keys()
    assert "out-dir" not in strategy_table.result_keys()
    changed = {**defaults(), "fedopt-eta": 0.5}
    monkeypatch.setattr(strategy_table, "defaults", lambda: changed)
    assert strategy_table.defaults_fingerprint() != before


def test_fingerprint_follows_the_defaults_a_strategy_takes_where_its_keys_say_0(monkeypatch):
    before = strategy_table.defaults_fingerprint()
    own = flower_builtins.FEDOPT_DEFAULTS
    monkeypatch.setitem(own, "fedyogi", {**own["fedyogi"], "eta": 0.01})
    assert strategy_table.defaults_fingerprint() != before


def test_rows_say_whether_a_strategy_is_within_the_tolerance():
    base = Result(final=0.9583, best=0.97, epsilon=None, seconds=20.0)
    near = strategy_table.table_row("fedyogi", Result(0.9083, 0.91, None, 21.0), base)
    far = strategy_table.table_row("dp-fixed", Result(0.9082, 0.91, 12.345, 22.0), base)
    assert near == "| `fedyogi` | 0.9083 | 0.9100 | -0.0500 | yes | – | 21.0 |"
    assert far == "| `dp-fixed` | 0.9082 | 0.9100 | -0.0501 | no | 12.3 | 22.0 |"


@pytest.mark.slow  # runs Flower simulations
def test_script_runs_strategies_and_writes_the_table_between_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    start, end = markers(strategy_table.SECTION)
    readme.write_text(f"# title\n{start}\nold table\n{end}\nafter\n", encoding="utf-8")
    assert strategy_table.main(["--strategies", "dp-fixed", "--rounds", "2", "--clients", "4",
                                "--page", str(readme)]) == 0
    text = section(readme)
    assert "old table" not in text and readme.read_text(encoding="utf-8").endswith(
        f"{end}\nafter\n")
    assert text in capsys.readouterr().out  # what it printed is what it wrote
    results, rounds, _ = parse(text)
    assert list(results) == ["weighted-fedavg", "dp-fixed"] and rounds == 2
    assert results["weighted-fedavg"].epsilon is None and results["dp-fixed"].epsilon > 0
    assert results["weighted-fedavg"].final > 0.5  # 2 rounds of real training
    assert strategy_table.FINGERPRINT.search(text)[1] == strategy_table.defaults_fingerprint()
