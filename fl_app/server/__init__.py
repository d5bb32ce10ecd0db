"""The server layer: the round loop, sampling, stopping, records, checkpoints and outputs."""
