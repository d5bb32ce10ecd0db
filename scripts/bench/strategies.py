"""Every registered strategy, with its default hyperparameters, on the default workload.

    python -m scripts.bench.strategies                  # every strategy; updates docs/results.md
    python -m scripts.bench.strategies --strategies fedadam dp-fixed --rounds 3 --no-results

Each run is `python run_simulation.py --run-config "strategy='<name>'"` (digits, MLP, 10 IID
clients, 20 rounds, seed 42), in this process through the same code path, one run at a
time. The markdown table (final and best centralized accuracy, the difference to
`weighted-fedavg`'s final accuracy, ε for the DP strategies, wall seconds) is printed and
written into docs/results.md between the strategy-table markers, with the fingerprint of the
defaults it was measured with (`defaults_fingerprint`; a test checks that it still
matches the schema's defaults, so a changed default calls for a new table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fl_app.app.config import RUN_SETTINGS, defaults
from fl_app.data import settings as data_settings
from fl_app.ml import settings as ml_settings
from scripts.bench.common import timed_run
from scripts.bench.results_page import (
    RESULTS_PAGE,
    add_results_option,
    read_section,
    write_section,
)
from strategies import context, flower_builtins, registry, validation
from strategies.accounting import PrivacyAccountant, default_delta

BASELINE = "weighted-fedavg"
TOLERANCE = 0.05  # a strategy's default must reach the baseline's final accuracy within this
SECTION = "strategy-table"  # its section of docs/results.md
HEADER = ("| strategy | final accuracy | best accuracy | Δ vs weighted-fedavg | "
          f"within {TOLERANCE:g} | ε | seconds |")
EPSILON_NOISE = (1.0, 2.0, 4.0, 8.0)
EPSILON_ACCOUNTING = {"`dp-sampling='fixed'`, `accountant='rdp'`": ("rdp", "fixed"),
                      "`dp-sampling='poisson'`, `accountant='pld'`": ("pld", "poisson")}
ATTEMPTS = 3  # per run: Flower's simulation runtime fails when Ray cannot start in time
FINGERPRINT = re.compile(r"defaults fingerprint `([0-9a-f]{12})`")


@dataclass(frozen=True)
class Result:
    """One strategy's run: final and best centralized accuracy, ε (DP only), wall time."""

    final: float
    best: float
    epsilon: float | None
    seconds: float


OFF_BY_DEFAULT = {"standardize", "rebalance"}  # data and model options off by default


def result_keys() -> list[str]:
    """The run-config keys whose defaults shape the table: the strategy choice, sampling,
    validation and every registered strategy's and wrapper's own keys (DP included), the
    model and training, the data and partitioning, the seed and the number of rounds.
    Modules of features that are off by default (compression, ...) are left out, so adding
    one does not call for a new table."""
    modules = (context, validation, *registry.STRATEGY_MODULES, *registry.WRAPPER_MODULES,
               ml_settings, data_settings)
    keys = {"num-server-rounds", "strategy", "dp-inner", *(s.key for s in RUN_SETTINGS),
            *(s.key for module in modules for s in module.SETTINGS)}
    # the synthetic dataset's own keys do not shape a digits run, nor do the data and
    # model options that are off by default (their `none`/false default is the table's)
    return sorted(key for key in keys
                  if not key.startswith("synthetic-") and key not in OFF_BY_DEFAULT)


def defaults_fingerprint() -> str:
    """12 hex digits of the SHA-256 of those keys' defaults and of the defaults a strategy
    takes where its keys say 0 (`flower_builtins.FEDOPT_DEFAULTS`): changes whenever one
    does."""
    values = defaults()
    text = json.dumps({**{key: values[key] for key in result_keys()},
                       "fedopt-defaults": flower_builtins.FEDOPT_DEFAULTS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=registry.strategy_names(),
                        choices=registry.strategy_names(), metavar="NAME",
                        help="registered names to run, in this order (default: all); "
                             "weighted-fedavg, the baseline, always runs first")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per run (default: num-server-rounds' default)")
    parser.add_argument("--clients", type=int, default=10,
                        help="simulated clients (default: 10, run_simulation.py's)")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE,
                        help="the results page to update (default: docs/results.md)")
    add_results_option(parser)
    parser.add_argument("--update", action="store_true",
                        help="keep the results table's other rows (and add their minutes): "
                             "run only --strategies, e.g. a newly registered one")
    args = parser.parse_args(argv)
    args.strategies = [BASELINE, *(s for s in dict.fromkeys(args.strategies) if s != BASELINE)]
    return args


def run_one(strategy: str, rounds: int | None, clients: int, out: Path) -> Result:
    """One default run of `strategy`, as run_simulation.py makes it; its accuracies and ε."""
    overrides = f"strategy='{strategy}'" + (f" num-server-rounds={rounds}" if rounds else "")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            history, seconds = timed_run(overrides, clients, out / f"attempt-{attempt}")
            break
        except RuntimeError as err:  # Ray's start-up gives up after 30 s on a loaded machine
            if attempt == ATTEMPTS:
                raise SystemExit(f"error: {strategy}: {err}") from err
            print(f"{strategy}: attempt {attempt} failed ({err}); trying again", flush=True)
    rounds_done = history["rounds"]
    accuracies = [r["centralized"]["accuracy"] for r in rounds_done]
    epsilon = rounds_done[-1].get("privacy", {}).get("epsilon")
    return Result(final=float(accuracies[-1]), best=float(max(accuracies)),
                  epsilon=None if epsilon is None else float(epsilon), seconds=seconds)


def epsilon(noise_multiplier: float, accounting: tuple[str, str], clients: int,
            rounds: int) -> float:
    """ε after `rounds` DP rounds of the default sampling fraction on `clients` clients, by
    the run's own accountant ((kind, sampling), e.g. ("rdp", "fixed"))."""
    rate = float(defaults()["fraction-fit"])
    accountant = PrivacyAccountant(*accounting, poisson_rate=rate)
    accountant.fix_delta(clients)
    for _ in range(rounds):
        accountant.record(accountant.event(noise_multiplier, round(rate * clients), clients))
    return accountant.epsilon()


def epsilon_table(clients: int, rounds: int) -> list[str]:
    """What a meaningful ε costs on this workload: ε by noise multiplier z and accounting."""
    lines = [f"ε of a DP strategy on this workload ({clients} clients, fraction-fit "
             f"{defaults()['fraction-fit']:g}, {rounds} rounds) by noise multiplier z, from the "
             "accountant (the noise on the average, z·C/m, grows with z):",
             "",
             "| z | " + " | ".join(f"{name}" for name in EPSILON_ACCOUNTING) + " |",
             "|---:|" + "---:|" * len(EPSILON_ACCOUNTING)]
    for z in EPSILON_NOISE:
        cells = [f"{epsilon(z, acc, clients, rounds):.1f}" for acc in EPSILON_ACCOUNTING.values()]
        lines.append(f"| {z:g} | " + " | ".join(cells) + " |")
    return lines


def table_row(strategy: str, result: Result, baseline: Result) -> str:
    """One markdown row."""
    delta = round(round(result.final, 4) - round(baseline.final, 4), 4)  # of the figures shown
    epsilon = "–" if result.epsilon is None else f"{result.epsilon:.1f}"
    within = "yes" if delta >= -TOLERANCE else "no"
    return (f"| `{strategy}` | {result.final:.4f} | {result.best:.4f} | {delta:+.4f} | "
            f"{within} | {epsilon} | {result.seconds:.1f} |")


def markdown(results: dict[str, Result], rounds: int, clients: int, minutes: float) -> str:
    """The results page's section: how it was made, then the table."""
    baseline = results[BASELINE]
    lines = [
        f"Every registered strategy with its default hyperparameters on the default workload "
        f"(`python run_simulation.py --run-config \"strategy='NAME'\"`: digits, MLP, "
        f"{clients} IID clients, {rounds} rounds, seed {defaults()['seed']}), one run each; "
        f"Δ is the final centralized accuracy minus `{BASELINE}`'s, ε is at δ = "
        f"{default_delta(clients):g}. Produced by `python -m scripts.bench.strategies` in "
        f"{minutes:.0f} min on this machine's 2 cores, shared with other jobs (seconds: "
        f"wall time of a run, start-up included; defaults fingerprint "
        f"`{defaults_fingerprint()}`).",
        "",
        HEADER,
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    order = [BASELINE, *registry.strategy_names()]  # rows in registry order, whatever ran first
    lines += [table_row(name, results[name], baseline)
              for name in sorted(results, key=order.index)]
    if any(result.epsilon is not None for result in results.values()):
        lines += ["", *epsilon_table(clients, rounds)]
    return "\n".join(lines)


ROW = re.compile(r"^\| `(?P<name>[a-z-]+)` \| (?P<final>[\d.]+) \| (?P<best>[\d.]+) \| "
                 r"[+-][\d.]+ \| (yes|no) \| (?P<eps>[\d.]+|–) \| (?P<seconds>[\d.]+) \|$")
CAPTION = re.compile(r"clients, (?P<rounds>\d+) rounds, .* in (?P<minutes>\d+) min")


def parse_table(text: str) -> tuple[dict[str, Result], int, int]:
    """The results, rounds and minutes a table section (`markdown`'s output) states."""
    results = {}
    for line in text.splitlines():
        if match := ROW.match(line):
            eps = match["eps"]
            results[match["name"]] = Result(final=float(match["final"]),
                                            best=float(match["best"]),
                                            epsilon=None if eps == "–" else float(eps),
                                            seconds=float(match["seconds"]))
    caption = CAPTION.search(text)
    if caption is None:
        raise SystemExit("error: the results page's strategy table has no caption to update")
    return results, int(caption["rounds"]), int(caption["minutes"])


def main(argv: list[str] | None = None) -> int:
    """Run every strategy once; print the table and update docs/results.md."""
    args = parse_args(argv)
    rounds = args.rounds or int(defaults()["num-server-rounds"])
    results: dict[str, Result] = {}
    earlier_minutes = 0
    if args.update:
        stated = read_section(SECTION, args.page) or ""
        results, stated_rounds, earlier_minutes = parse_table(stated)
        if stated_rounds != rounds:
            raise SystemExit(f"error: the results table has {stated_rounds} rounds, this run "
                             f"{rounds}: rerun the whole table")
        args.strategies = [s for s in args.strategies if s != BASELINE or BASELINE not in results]
    start = time.monotonic() - earlier_minutes * 60
    with tempfile.TemporaryDirectory(prefix="strategy-table-") as scratch:
        for strategy in args.strategies:
            results[strategy] = run_one(strategy, args.rounds, args.clients,
                                        Path(scratch) / strategy)
            print(f"{strategy:>20} | final {results[strategy].final:.4f} | "
                  f"{results[strategy].seconds:.1f} s", flush=True)
            section = markdown(results, rounds, args.clients, (time.monotonic() - start) / 60)
            if not args.no_results:  # after every run: a cut-off table still shows its rows
                write_section(SECTION, section, args.page)
    print(section)
    if not args.no_results:
        print(f"{args.page} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
