"""Intra-layer tensor parallelism (Shoeybi et al., 2019): the process grid, the f/g operators, parallel layers."""
