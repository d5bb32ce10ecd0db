"""The command-line layer: `run_simulation.py`'s implementation and the run summary."""
