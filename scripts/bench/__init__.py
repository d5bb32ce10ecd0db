"""The benchmarks: each prints the figures of one table, measured side by side in one run.

A bench is named after what it measures, in snake_case, without `benchmark_` or `_table`
(`strategies`, `deployment`, `pruning`), and runs from the repository's root as
`python -m scripts.bench.<name>` (`--help` for its options). What they share (one
simulation run, its history and accuracies, the options every table has) is
`scripts.bench.common`.
"""
