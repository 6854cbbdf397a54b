r"""Does longer SimCLR pretraining help fine-tuning on PneumoniaMNIST? Chosen on VALIDATION only.

  # the longer pretraining run: the headline's command with twice the steps (88 epochs)
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:pneumoniamnist \
    --config.data.path=../shared/data/pneumoniamnist.npz --config.total_steps=3000 \
    --workdir=workdirs/simclr_pneumoniamnist_3000
  # then both encoders, fine-tuned the same way and scored on validation
  python -m experiments.label_fraction_sweep \
    --config=configs/sweeps/pneumoniamnist_pretraining_length.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/pneumoniamnist_pretraining_length

Inits: `steps_1500`, the headline's pretraining run (configs/pretrain_simclr.py:pneumoniamnist,
workdirs/simclr_pneumoniamnist), and `steps_3000`, the same command with
`--config.total_steps=3000` (its cosine schedule spans the 3000 steps; not a continuation).
Both fine-tune with configs/sweeps/pneumoniamnist.py's SIMCLR_RECIPE at 1% and 10% of the
labels, seed 0, as the recipe rounds did (configs/sweeps/pneumoniamnist_recipes.py); the test
split is never read here. The winner by mean validation macro AUC over the two fractions is the
pretraining length worth a test run.

Measured (experiments/results/pneumoniamnist_pretraining_length/): steps_1500 0.920 (1%) /
0.985 (10%), mean 0.953, the recipe round's numbers exactly; steps_3000 0.887 / 0.983, mean
0.935, although its end-of-run linear probe scored higher (0.986 against 0.982). The 3000-step
run took 912 s on the 2-core box while nothing else ran. Longer pretraining lost, so it was not
run on test.
"""

import ml_collections

from configs.sweeps import pneumoniamnist, pneumoniamnist_recipes

PRETRAINED = {"steps_1500": pneumoniamnist_recipes.PRETRAINED,
              "steps_3000": "workdirs/simclr_pneumoniamnist_3000"}


def get_config() -> ml_collections.ConfigDict:
  recipe = pneumoniamnist_recipes.RECIPES[pneumoniamnist.SIMCLR_RECIPE]
  return pneumoniamnist_recipes.validation_sweep(
      PRETRAINED, {name: recipe for name in PRETRAINED}, label_fractions=(0.01, 0.1),
      seeds=(0,), baseline="steps_1500")
