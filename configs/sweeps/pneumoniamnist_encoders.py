r"""Which SimCLR pretraining run fine-tunes best on PneumoniaMNIST? Chosen on VALIDATION only.

  # the pretraining runs compared (steps_1500 is configs/pretrain_simclr.py:pneumoniamnist as is):
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:pneumoniamnist \
    --config.data.path=../shared/data/pneumoniamnist.npz --config.total_steps=3000 \
    --workdir=workdirs/simclr_pneumoniamnist_3000
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:pneumoniamnist \
    --config.data.path=../shared/data/pneumoniamnist.npz --config.model.stem=small_s2 \
    --workdir=workdirs/simclr_pneumoniamnist_small_s2
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:pneumoniamnist \
    --config.data.path=../shared/data/pneumoniamnist.npz --config.model.name=R_small \
    --workdir=workdirs/simclr_pneumoniamnist_r_small
  # then every encoder, fine-tuned the same way and scored on validation
  python -m experiments.label_fraction_sweep --config=configs/sweeps/pneumoniamnist_encoders.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/pneumoniamnist_encoders

Encoders (pneumoniamnist_recipes.ENCODERS: the pretraining workdir, and the fine-tuning keys
that the encoder needs):
  steps_1500  configs/pretrain_simclr.py:pneumoniamnist as is (1500 steps).
  steps_3000  the same command with `--config.total_steps=3000` (its cosine schedule spans the
              3000 steps; not a continuation).
  small_s2    that command with the small-image stem `small_s2` (a 3x3/2 root conv
              and no max-pool: 2x the feature-map side of BiT's root, 3.2x the FLOPs of a
              SimCLR step); it fine-tunes with `model.stem=small_s2`, as it must.
  r_small     that command with `--config.model.name=R_small` (R_tiny at twice the
              width: 2.0 M parameters); it fine-tunes as R_small.
Each fine-tunes with configs/sweeps/pneumoniamnist.py's SIMCLR_RECIPE at 1% and 10% of the
labels, seeds 0-2; the test split is never read here. The winner by mean validation macro AUC
over the two fractions becomes configs/sweeps/pneumoniamnist.py's SIMCLR_ENCODER.

Part of the superseded exploratory rounds; scores and what each choice then scored on test:
experiments/results/pneumoniamnist_encoders/README.md.
"""

import ml_collections

from configs.sweeps import pneumoniamnist, pneumoniamnist_recipes

ENCODERS = pneumoniamnist_recipes.ENCODERS


def get_config() -> ml_collections.ConfigDict:
  recipe = pneumoniamnist_recipes.RECIPES[pneumoniamnist.SIMCLR_RECIPE]
  return pneumoniamnist_recipes.validation_sweep(
      {name: workdir for name, (workdir, _) in ENCODERS.items()},
      {name: pneumoniamnist_recipes.merged(recipe, needs)
       for name, (_, needs) in ENCODERS.items()},
      label_fractions=(0.01, 0.1), seeds=(0, 1, 2), baseline="steps_1500")
