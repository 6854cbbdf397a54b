r"""Which SimCLR pretraining run fine-tunes best on PneumoniaMNIST? Chosen on VALIDATION only.

  # the pretraining runs compared (steps_1500 is the headline's, README command 1):
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
  steps_1500  the headline's run (configs/pretrain_simclr.py:pneumoniamnist, 1500 steps).
  steps_3000  the same command with `--config.total_steps=3000` (its cosine schedule spans the
              3000 steps; not a continuation).
  small_s2    the headline's command with the small-image stem `small_s2` (a 3x3/2 root conv
              and no max-pool: 2x the feature-map side of BiT's root, 3.2x the FLOPs of a
              SimCLR step); it fine-tunes with `model.stem=small_s2`, as it must.
  r_small     the headline's command with `--config.model.name=R_small` (R_tiny at twice the
              width: 2.0 M parameters); it fine-tunes as R_small.
Each fine-tunes with configs/sweeps/pneumoniamnist.py's SIMCLR_RECIPE at 1% and 10% of the
labels, seeds 0-2 (the recipe rounds used seed 0 only: configs/sweeps/pneumoniamnist_recipes.py);
the test split is never read here. The winner by mean validation macro AUC over the two
fractions becomes configs/sweeps/pneumoniamnist.py's SIMCLR_ENCODER.

Measured (experiments/results/pneumoniamnist_encoders/), mean validation macro AUC over seeds
0-2 at 1% / 10%: small_s2 0.947 / 0.985 (mean 0.966), steps_1500 0.944 / 0.981 (0.962),
steps_3000 0.934 / 0.978 (0.956), r_small 0.942 / 0.966 (0.954; added in a later pass, its
pretraining took 1629 s, about half of it beside other runs; end-of-run linear probe 0.985,
random R_small 0.914). With seed 0 alone (the first pass): 0.959, 0.953, 0.935.
Longer pretraining lost although its end-of-run linear probe scored higher (0.986 against
0.982). small_s2 won and was run on test at 10% of the labels after the seed-0 pass: 0.885 +-
0.021 over 3 seeds, against 0.908 +- 0.019 for steps_1500 with the same recipe (README).
Seeds 1 and 2 were run after that test result was known. Pretraining took 1542 s for
small_s2 and 912 s for steps_3000, each with nothing else running.
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
