"""Final accuracy of robust and plain aggregation under each simulated attack.

    python -m scripts.bench.robustness                # 25 runs, ~7 min; updates docs/results.md
    python -m scripts.bench.robustness --no-results   # print only

Every run is the default workload (digits, MLP, local-epochs 5) on Flower's simulation
engine with `--clients` clients (15: Bulyan needs n >= 4f + 3) of which
`--attack-fraction` (20%: f = 3) run the attack; Krum and Bulyan are told f. The table
(final centralized accuracy, one row per strategy, one column per attack) is printed and
written into docs/results.md between the robustness markers (at its end the first time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fl_app.app.config import defaults
from fl_app.cli import simulate
from fl_app.client.faults import ATTACKS
from scripts.bench.common import table_parser
from scripts.bench.results_page import add_results_option, write_section

STRATEGIES = ("weighted-fedavg", "fedmedian", "fedtrimmedavg", "krum", "bulyan")
SECTION = "robustness-table"  # its section of docs/results.md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = table_parser(__doc__, rounds=10, clients=15, seeds=None)
    parser.add_argument("--attack-fraction", type=float, default=0.2,
                        help="fraction of attackers (0.2)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--seed", type=int, default=42)
    add_results_option(parser)
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, strategy: str, attack: str) -> str:
    """The `--run-config` of one cell of the table."""
    malicious = int(args.attack_fraction * args.clients + 0.5)
    return (f"num-server-rounds={args.rounds} strategy='{strategy}' attack='{attack}' "
            f"attack-fraction={args.attack_fraction} num-malicious-clients={malicious} "
            f"fraction-evaluate=0 seed={args.seed}")


def final_accuracy(args: argparse.Namespace, strategy: str, attack: str, out: Path) -> float:
    """Run one simulation; return its last round's centralized accuracy."""
    code = simulate.main(["--num-supernodes", str(args.clients),
                          "--run-config", run_config(args, strategy, attack),
                          "--out", str(out)])
    if code != 0:
        raise SystemExit(f"run {strategy} / {attack} failed with exit code {code}")
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    return float(history["rounds"][-1]["centralized"]["accuracy"])


def markdown(args: argparse.Namespace, results: dict[tuple[str, str], float],
             minutes: float) -> str:
    """The results page's section: how it was made, then the table."""
    malicious = int(args.attack_fraction * args.clients + 0.5)
    scale, std = defaults()["attack-scale"], defaults()["attack-noise-std"]
    lines = [
        "## Robustness",
        "",
        f"Final centralized accuracy on the default workload (digits, MLP, "
        f"{args.rounds} rounds, {args.clients} simulated clients of which {malicious} "
        f"({args.attack_fraction:.0%}) attack; Krum and Bulyan assume "
        f"`num-malicious-clients={malicious}`; seed {args.seed}). "
        "Attacks (`fl_app/client/faults.py`): "
        f"`sign-flip` sends −{scale:g}× the honest update, `scale` +{scale:g}×, `gaussian` "
        f"the global model plus N(0, {std:g}²) noise, `label-flip` trains on labels c → 9 − c. "
        "Produced by "
        f"`python -m scripts.bench.robustness` in {minutes:.0f} min.",
        "",
        "| strategy | " + " | ".join(args.attacks) + " |",
        "|---|" + "---:|" * len(args.attacks),
    ]
    for strategy in args.strategies:
        cells = [f"{results[strategy, attack]:.3f}" for attack in args.attacks]
        lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(args: argparse.Namespace, results: dict[tuple[str, str], float]) -> None:
    """A rich table of the results."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Final accuracy, {args.attack_fraction:.0%} attackers "
                        f"({args.clients} clients, {args.rounds} rounds)")
    table.add_column("strategy")
    for attack in args.attacks:
        table.add_column(attack, justify="right")
    for strategy in args.strategies:
        table.add_row(strategy, *(f"{results[strategy, a]:.3f}" for a in args.attacks))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Run every strategy under every attack; print the table and update docs/results.md."""
    args = parse_args(argv)
    start = time.monotonic()
    results: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as scratch:
        for strategy in args.strategies:
            for attack in args.attacks:
                out = Path(scratch) / f"{strategy}-{attack}"
                results[strategy, attack] = final_accuracy(args, strategy, attack, out)
                print(f"{strategy:>16} | {attack:>10} | accuracy "
                      f"{results[strategy, attack]:.4f}", flush=True)
    minutes = (time.monotonic() - start) / 60
    print_table(args, results)
    print(f"{len(results)} runs in {minutes:.1f} min")
    if not args.no_results:
        write_section(SECTION, markdown(args, results, minutes))
        print("docs/results.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
