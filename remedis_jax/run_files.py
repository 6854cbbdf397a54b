"""What a run leaves in its workdir and how its process ends: the names every reader shares.

Imports nothing (no JAX): the sweeps, studies and reports read runs through these names
without loading the trainers.
"""

RESULTS_FILE = "results.json"  # written by a supervised trainer when its final evaluation is done
METRICS_FILE = "metrics.jsonl"  # every logged scalar, one JSON object per line
EXIT_PREEMPTED = 75  # the exit status of a run that saved on SIGTERM or a first Ctrl-C
