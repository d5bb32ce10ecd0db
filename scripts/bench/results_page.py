"""Where every bench's table goes: its own section of docs/results.md.

A bench prints its table and writes the same table, with the command that made it,
between its markers `<!-- <name>:start -->` and `<!-- <name>:end -->` on the results page
(`write_section`; appended with its markers the first time). `publish` does both for a
rich `Table`, `write_markdown` for a bench's own Markdown, and `recorded` for whatever a
bench prints inside a `with` block (its Markdown table, or plain lines as a text block).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "results.md"


def add_results_option(parser: argparse.ArgumentParser) -> None:
    """`--no-results`: the bench prints its table without writing it into the results page."""
    parser.add_argument("--no-results", action="store_true",
                        help="print only; do not update docs/results.md")


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section `name`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_section(name: str, page: Path = RESULTS_PAGE) -> str | None:
    """What lies between section `name`'s markers on `page` (None: no such section)."""
    start, end = markers(name)
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return None
    return text.split(start + "\n", 1)[1].split("\n" + end, 1)[0]


def with_section(text: str, name: str, markdown: str, page: Path = RESULTS_PAGE) -> str:
    """`text` (the contents of `page`) with `markdown` between section `name`'s markers
    (appended, with them, at the end when it has neither marker)."""
    start, end = markers(name)
    if (start in text) != (end in text):
        raise SystemExit(f"error: {page} has only one of the markers {start} / {end}: "
                         "restore the other, or remove both")
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_section(name: str, markdown: str, page: Path = RESULTS_PAGE) -> None:
    """Put `markdown` between section `name`'s markers on `page` (`with_section`)."""
    text = page.read_text(encoding="utf-8")
    page.write_text(with_section(text, name, markdown, page), encoding="utf-8")


def markdown_table(table: Table) -> str:
    """A rich `Table` as a Markdown table (its title, if any, as a caption above it)."""
    headers = [str(column.header) for column in table.columns]
    rows = zip(*(list(column.cells) for column in table.columns))
    align = ["---:" if column.justify == "right" else "---" for column in table.columns]
    lines = [f"| {' | '.join(headers)} |", f"|{'|'.join(align)}|"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    caption = f"{table.title}\n\n" if table.title else ""
    return caption + "\n".join(lines)


def command_line(module: str) -> str:
    """`python -m <module> <this process's arguments>`: how the table was made."""
    return " ".join(["python -m", module, *sys.argv[1:]])


def publish(name: str, table: Table, module: str, console: Console | None = None,
            write: bool = True, page: Path = RESULTS_PAGE) -> None:
    """Print `table` (on `console`) and, unless `write` is False, write it under the
    command that made it (`module` run with this process's arguments) into section `name`
    of the results page."""
    (console or Console()).print(table)
    if write:
        write_markdown(name, markdown_table(table), module, page)


def write_markdown(name: str, markdown: str, module: str, page: Path = RESULTS_PAGE) -> None:
    """Write a bench's own Markdown table into section `name`, under the command that made
    it (`module` run with this process's arguments)."""
    write_section(name, f"`{command_line(module)}`\n\n{markdown}", page)


class _Tee(io.TextIOBase):
    """A text stream that writes to `stream` and keeps a copy."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        """Write `text` through, and keep it."""
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        """Flush the stream written through."""
        self.stream.flush()


@contextlib.contextmanager
def recorded(name: str, module: str, text: bool = False, write: bool = True,
             page: Path = RESULTS_PAGE) -> Iterator[None]:
    """Print as usual inside the block, then (unless `write` is False: a bench's
    `--no-results`) write what was printed into section `name` (Markdown as printed, or
    with `text` as a text block) under the command that made it."""
    if not write:
        yield
        return
    tee = _Tee(sys.stdout)  # type: ignore[arg-type]
    with contextlib.redirect_stdout(tee):
        yield
    printed = tee.copy.getvalue().strip()
    write_markdown(name, f"```text\n{printed}\n```" if text else printed, module, page)
