"""Benchmark: homomorphic encryption (CKKS) against plaintext weighted-fedavg.

    python -m scripts.bench.homomorphic [--clients 10] [--repeats 3] [--accuracy] [--rounds 20]

Per client and round, for the default model (digits `mlp`, 4,810 weights) and one 10x
larger (the same MLP with 640 hidden units, 48,010 weights), it times and sizes what
homomorphic encryption adds, on the app's own code paths:
  * bytes up (the client's reply) and down (the global model it receives), as Flower
    serializes them (`ndarrays_to_parameters`);
  * client time: decrypting the global model plus encrypting its update (HE) against
    (de)serializing plaintext arrays;
  * server time per client: the strategy's `aggregate_fit` over `--clients` replies
    (`HomomorphicAggregation`: deserialize and add ciphertexts; `WeightedFedAvg`: the
    weighted average), divided by the number of clients.
Times are the best of `--repeats`. With `--accuracy` it also runs the default workload
(10 clients, `--rounds` rounds) through run_simulation.py both ways and prints the final
model's accuracy on the server's test set (under HE the key holder's decrypted
`final_model.keras`) and the median round time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.common import NDArrays, ndarrays_to_parameters, parameters_to_ndarrays

from fl_app.app.config import resolve
from fl_app.cli.simulate import load_run_config
from fl_app.cli.simulate import main as run_simulation
from fl_app.data.sources import data_source
from fl_app.data.types import DataSettings
from fl_app.ml.models import build_model
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.protocol import ckks
from fl_app.server.outputs import MODEL_FILE
from scripts.bench.results_page import add_results_option, write_markdown
from strategies.homomorphic import HomomorphicAggregation
from strategies.weighted_fedavg import WeightedFedAvg
from tests.flower_objects import results  # real FitRes objects, no client behind them


def wide_weights(weights: NDArrays, factor: int, rng: np.random.Generator) -> NDArrays:
    """Weights of the default MLP with `factor` times its hidden units (Dense-Dense)."""
    w1, _, w2, b2 = weights
    hidden = w1.shape[1] * factor
    return [rng.normal(0, 0.1, (w1.shape[0], hidden)).astype(np.float32),
            np.zeros(hidden, np.float32),
            rng.normal(0, 0.1, (hidden, w2.shape[1])).astype(np.float32), b2.copy()]


def best(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def nbytes(arrays: NDArrays) -> int:
    """Bytes of `arrays` as Flower serializes them."""
    return sum(len(t) for t in ndarrays_to_parameters(arrays).tensors)


def measure(weights: NDArrays, clients: int, repeats: int, keys: tuple[Path, Path]) -> dict:
    """Bytes and seconds per client and round, plaintext and HE, for one model."""
    rng = np.random.default_rng(0)
    updates = [([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in weights],
                int(rng.integers(100, 200))) for _ in range(clients)]
    num_values = sum(w.size for w in weights)
    secret, public = ckks.load_secret_context(keys[1]), ckks.load_public_context(keys[0])

    plain_results = results(updates)
    fedavg = WeightedFedAvg()
    plain_client = best(lambda: parameters_to_ndarrays(ndarrays_to_parameters(weights)), repeats)
    plain_server = best(lambda: fedavg.aggregate_fit(1, plain_results, []), repeats) / clients

    replies = [ckks.encrypt_update(secret, w, n) for w, n in updates]
    he_results = results([(r, 1) for r in replies])
    he = HomomorphicAggregation(WeightedFedAvg(), public_context=public, num_values=num_values,
                                min_fit_clients=1)
    aggregate, _ = he.aggregate_fit(1, he_results, [])
    if aggregate is None:
        raise RuntimeError("the homomorphic aggregation made no model")
    encrypted_sum = parameters_to_ndarrays(aggregate)
    encrypt = best(lambda: ckks.encrypt_update(secret, weights, 150), repeats)
    decrypt = best(lambda: ckks.decrypt_average(secret, encrypted_sum, weights), repeats)
    he_server = best(lambda: he.aggregate_fit(1, he_results, []), repeats) / clients
    got = ckks.decrypt_average(secret, encrypted_sum, weights)
    want = [sum(n * u[i].astype(np.float64) for u, n in updates) / sum(n for _, n in updates)
            for i in range(len(weights))]
    flat_got = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    flat_want = np.concatenate([w.ravel() for w in want])
    return {"weights": num_values, "chunks": len(replies[0]),
            "plain_up": nbytes(weights), "plain_down": nbytes(weights),
            "he_up": nbytes(replies[0]), "he_down": nbytes(encrypted_sum),
            "plain_client_s": plain_client, "plain_server_s": plain_server,
            "he_client_s": encrypt + decrypt, "he_encrypt_s": encrypt, "he_decrypt_s": decrypt,
            "he_server_s": he_server,
            "relative_error": float(np.max(np.abs(flat_got - flat_want))
                                    / np.max(np.abs(flat_want)))}


def overhead(rows: dict[str, dict]) -> str:
    """One table (plain text): bytes and times per client per round."""
    lines = [f"{'model':<16}{'weights':>8}{'chunks':>7}{'bytes up/down plain':>21}"
          f"{'bytes up/down HE':>19}{'x':>6}{'client s plain':>16}{'client s HE':>13}"
          f"{'server s/client plain':>23}{'server s/client HE':>20}{'rel. error':>12}"]
    for name, r in rows.items():
        lines.append(f"{name:<16}{r['weights']:>8}{r['chunks']:>7}"
              f"{r['plain_up']:>10,}/{r['plain_down']:<10,}{r['he_up']:>9,}/{r['he_down']:<9,}"
              f"{r['he_up'] / r['plain_up']:>6.0f}{r['plain_client_s']:>16.5f}"
              f"{r['he_client_s']:>13.4f}{r['plain_server_s']:>23.6f}{r['he_server_s']:>20.4f}"
              f"{r['relative_error']:>12.1e}")
    lines.append("client s HE = encrypt + decrypt (" + ", ".join(
        f"{n}: {r['he_encrypt_s']:.4f} + {r['he_decrypt_s']:.4f}" for n, r in rows.items()) + ")")
    return "\n".join(lines)


def final_model_accuracy(out: Path) -> float:
    """The test accuracy of a finished run's `final_model.keras` on the server's test set
    (under HE the key holder's decrypted model: the server itself cannot evaluate one)."""
    import keras

    cfg = resolve(json.loads((out / "history.json").read_text())["config"])
    train = TrainSettings.from_config(cfg)
    trainer = trainer_for(train, data_source(DataSettings.from_config(cfg)).spec)
    trainer.set_weights(keras.models.load_model(out / MODEL_FILE).get_weights())
    _, metrics = trainer.evaluate(data_source(DataSettings.from_config(cfg)).test_set())
    return float(metrics["accuracy"])


def run_workload(out: Path, rounds: int, extra: str) -> dict:
    """Run the default workload; return its final model's test accuracy and round times."""
    code = run_simulation(["--num-supernodes", "10", "--out", str(out), "--run-config",
                                f"num-server-rounds={rounds} {extra}"])
    if code != 0:
        sys.exit(f"error: the run in {out} failed")
    history = json.loads((out / "history.json").read_text())
    seconds = [r["seconds"] for r in history["rounds"][2:]]
    return {"accuracy": final_model_accuracy(out), "round_s": statistics.median(seconds),
            "rounds": len(history["rounds"]) - 1}


def main() -> None:
    """Print the overhead table (and with --accuracy, the accuracy comparison); write them
    into docs/results.md."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    add_results_option(parser)
    args = parser.parse_args()
    cfg = load_run_config(None)
    spec = data_source(DataSettings.from_config(cfg)).spec
    weights = build_model(str(cfg["model"]), spec, int(cfg["seed"])).get_weights()
    with tempfile.TemporaryDirectory() as folder:
        keys = (Path(folder) / "public.bin", Path(folder) / "secret.bin")
        ckks.write_key_pair(*keys)
        rows = {"default mlp": measure(weights, args.clients, args.repeats, keys),
                "10x mlp": measure(wide_weights(weights, 10, np.random.default_rng(1)),
                                   args.clients, args.repeats, keys)}
        printed = [overhead(rows)]
        print(printed[0])
        if args.accuracy:
            plain = run_workload(Path(folder) / "plain", args.rounds, "")
            he = run_workload(Path(folder) / "he", args.rounds, "homomorphic-encryption='ckks'")
            printed.append(f"default workload, {args.rounds} rounds, 10 clients: test accuracy "
                           f"plaintext {plain['accuracy']:.4f}, HE {he['accuracy']:.4f} "
                           f"(difference {he['accuracy'] - plain['accuracy']:+.4f}); median "
                           f"round {plain['round_s']:.2f} s plaintext, {he['round_s']:.2f} s HE")
            print(printed[-1])
    if not args.no_results:
        write_markdown("homomorphic", "```text\n" + "\n".join(printed) + "\n```",
                       "scripts.bench.homomorphic")


if __name__ == "__main__":
    main()
