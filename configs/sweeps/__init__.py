"""Sweep configs for experiments/label_fraction_sweep.py and experiments/ood_study.py."""
