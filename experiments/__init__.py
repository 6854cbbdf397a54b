"""Experiment scripts: label-fraction sweeps, out-of-distribution studies and benchmarks."""
