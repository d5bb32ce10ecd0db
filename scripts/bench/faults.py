"""The default workload with broken clients: does the run complete and still learn?

    python -m scripts.bench.faults                      # 30% raise, 10% NaN (issue 5)
    python -m scripts.bench.faults --run-config "fault-garbage-fraction=0.2"

Runs `run_simulation.py` (10 clients, 20 rounds, digits) with the fault-injection keys
and prints the rounds completed, failures and rejections per round, and the final
centralized accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fl_app.cli import simulate
from scripts.bench.results_page import add_results_option, recorded

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_FAULTS = "fault-raise-fraction=0.3 fault-nan-fraction=0.1"


def main(argv: list[str] | None = None) -> int:
    """Run the faulty simulation and print its outcome."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--run-config", default=DEFAULT_FAULTS)
    add_results_option(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="faults-") as out:
        code = simulate.main(["--num-supernodes", str(args.num_supernodes),
                              "--run-config", args.run_config, "--out", out])
        if code != 0:
            return code
        history = json.loads((Path(out) / "history.json").read_text(encoding="utf-8"))
    rounds = history["rounds"][1:]
    failures = sorted({r["fit"]["num_failures"] for r in rounds})
    rejected = sorted({r["fit"]["num_rejected"] for r in rounds})
    with recorded("faults", "scripts.bench.faults", text=True, write=not args.no_results):
        print(f"faults: {args.run_config}; {args.num_supernodes} clients")
        print(f"rounds completed: {len(rounds)} of {history['config']['num-server-rounds']} "
              f"(stopped: {history['stopped']}); failures per round: {failures}; "
              f"rejected per round: {rejected}")
        print(f"final centralized accuracy: {rounds[-1]['centralized']['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
