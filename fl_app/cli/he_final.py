"""A key holder turns a homomorphically encrypted run's final aggregate into a Keras model.

    python -m fl_app.cli.he_final --dir RUN_DIR --key-file NODE_KEY [--out FILE]

Under `homomorphic-encryption=ckks` the server holds only the encrypted sum of the last
round's updates (`final_model.ckks.npz` in the run's output folder) and cannot write
`final_model.keras`. A node (any holder of the shared secret key) runs this step: it builds
the run's model from the config in `history.json`, decrypts the aggregate, divides by the
summed example count and saves the compiled model (0600) to `RUN_DIR/final_model.keras`
or `--out`. `run_simulation.py` does it itself after an encrypted simulation, where it made
the key. The key file is read, never copied or logged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fl_app.app.config import resolve
from fl_app.data.sources import data_spec
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.protocol import ckks
from fl_app.schema import ConfigError, RunConfig
from fl_app.server.outputs import ENCRYPTED_MODEL_FILE, MODEL_FILE, private_files


def read_encrypted(path: Path) -> list[np.ndarray]:
    """The chunks of an encrypted aggregate file, in order; ConfigError if unreadable."""
    try:
        with np.load(path) as archive:
            return [archive[f"chunk_{i}"] for i in range(len(archive.files))]
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"{path} is not an encrypted aggregate: {err}") from err


def decrypt_final_model(cfg: RunConfig, key_file: str | Path, encrypted: Path,
                        out: Path) -> Path:
    """Decrypt `encrypted` with the node's key into the run's model, saved at `out`."""
    trainer = trainer_for(TrainSettings.from_config(cfg), data_spec(DataSettings.from_config(cfg)))
    context = ckks.load_secret_context(key_file)
    try:
        weights = ckks.decrypt_average(context, read_encrypted(encrypted), trainer.get_weights())
    except ValueError as err:
        raise ConfigError(f"{encrypted} does not fit the run's model: {err}") from err
    trainer.set_weights(weights)
    with private_files():
        trainer.model.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Decrypt a run's final aggregate into final_model.keras."""
    parser = argparse.ArgumentParser(prog="python -m fl_app.cli.he_final", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="the run's output folder")
    parser.add_argument("--key-file", required=True, help="this node's secret key file")
    parser.add_argument("--out", default=None, help="where to save the model "
                        "(default: DIR/final_model.keras)")
    args = parser.parse_args(argv)
    run_dir = Path(args.dir)
    try:
        config = json.loads((run_dir / "history.json").read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        print(f"error: {run_dir}/history.json cannot be read: {err!r}", file=sys.stderr)
        return 2
    try:
        out = decrypt_final_model(resolve(config), args.key_file, run_dir / ENCRYPTED_MODEL_FILE,
                                  Path(args.out) if args.out else run_dir / MODEL_FILE)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"final model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
