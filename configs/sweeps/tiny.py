r"""Label-fraction sweep at quickstart scale: built-in synthetic chest X-rays, CPU, minutes.

  python -m experiments.label_fraction_sweep --config=configs/sweeps/tiny.py \
    --workdir=workdirs/quickstart/sweep

Grid: scratch vs REMEDIS (the quickstart's SimCLR pretraining run) x 3 label fractions (2%, 10%,
100% of 2048 site-A training images) x 2 seeds = 12 `configs/finetune.py:tiny` runs of 800
steps (under a minute each on a CPU), tested in distribution (site A) and at site B. Needs
`make quickstart` (or any SimCLR run of configs/pretrain_simclr.py:tiny) first; point elsewhere
with
  --config.inits.remedis=workdirs/simclr_tiny            (a pretraining workdir), or
  --config.inits.remedis=workdirs/quickstart/export/step_300   (an export).
Without pretraining, `--config=configs/sweeps/tiny.py:scratch` sweeps scratch only.

The REMEDIS paper's grid (1, 2, 5, 10, 25, 50, 100%, 3+ seeds) is the default of
configs/sweeps/common.default_sweep_config(); this file trades it for CPU minutes,
so its numbers are a smoke-level demonstration, not evidence.
"""

import ml_collections

from configs.sweeps import common as sweep_common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:tiny"
  config.label_fractions = (0.02, 0.1, 1.0)
  config.seeds = (0, 1)
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  if arg != "scratch":
    config.inits.remedis = "workdirs/quickstart/pretrain_simclr"
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.match_tolerance = 0.0
  config.overrides = ml_collections.ConfigDict({
      # The tiny recipe's length (configs/finetune.py): shorter runs leave scratch underfitted
      # on the full split, which would flatter any pretrained init.
      "total_steps": 800,
      "eval_every_steps": 100,
      "test_sets": ("in_distribution=test@A", "site_B=test@B"),
      # Robustness perturbations re-run every test set 7 times: not what a sweep measures.
      "robustness": {"perturbations": ()},
      "data": {"num_examples": {"val": 256, "test": 512}},
  })
  return config
