"""Every bench writes its table into its own section of docs/results.md."""

from __future__ import annotations

from rich.table import Table

from scripts.bench.results_page import (
    markdown_table,
    publish,
    read_section,
    recorded,
    write_section,
)


def test_a_section_is_appended_once_then_replaced_in_place(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nintro\n", encoding="utf-8")
    write_section("pruning", "| a |\n|---|\n| 1 |", page)
    write_section("other", "x", page)
    write_section("pruning", "| a |\n|---|\n| 2 |", page)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nintro\n")
    assert text.count("<!-- pruning:start -->") == 1 and "| 1 |" not in text
    assert read_section("pruning", page) == "| a |\n|---|\n| 2 |"
    assert text.index("<!-- pruning:start -->") < text.index("<!-- other:start -->")
    assert read_section("missing", page) is None


def test_a_rich_table_becomes_markdown_with_its_caption_and_alignment():
    table = Table(title="Final accuracy")
    table.add_column("strategy")
    table.add_column("accuracy", justify="right")
    table.add_row("fedavg", "0.958")
    table.add_row("krum", "0.931")
    assert markdown_table(table) == (
        "Final accuracy\n\n| strategy | accuracy |\n|---|---:|\n| fedavg | 0.958 |\n"
        "| krum | 0.931 |")


def test_publish_prints_the_table_and_writes_it_under_its_command(tmp_path, capsys, monkeypatch):
    page = tmp_path / "results.md"
    page.write_text("# Results\n", encoding="utf-8")
    monkeypatch.setattr("sys.argv", ["fednova.py", "--seeds", "1"])
    table = Table()
    table.add_column("strategy")
    table.add_row("fednova")
    publish("fednova", table, "scripts.bench.fednova", page=page)
    assert "fednova" in capsys.readouterr().out
    assert read_section("fednova", page) == (
        "`python -m scripts.bench.fednova --seeds 1`\n\n| strategy |\n|---|\n| fednova |")


def test_what_a_bench_prints_in_the_block_is_what_it_writes(tmp_path, capsys, monkeypatch):
    page = tmp_path / "results.md"
    page.write_text("# Results\n", encoding="utf-8")
    monkeypatch.setattr("sys.argv", ["pruning.py"])
    with recorded("pruning", "scripts.bench.pruning", page=page):
        print("| run | accuracy |\n|---|---:|\n| 50% | 0.95 |")
    with recorded("faults", "scripts.bench.faults", text=True, page=page):
        print("rounds completed: 5 of 5")
    assert "| 50% | 0.95 |" in capsys.readouterr().out
    assert read_section("pruning", page) == (
        "`python -m scripts.bench.pruning`\n\n| run | accuracy |\n|---|---:|\n| 50% | 0.95 |")
    assert read_section("faults", page) == (
        "`python -m scripts.bench.faults`\n\n```text\nrounds completed: 5 of 5\n```")
