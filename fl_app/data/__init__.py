"""The data layer: datasets, their partitioning across clients, and a node's own file."""
