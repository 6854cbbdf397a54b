"""Study configs for experiments/study.py: a protocol declared before the test split is read."""
