r"""Round 2 of the fine-tuning recipe for PneumoniaMNIST: input resolution and augmentation.

Chosen on VALIDATION only; the test split is never read here.

  python -m experiments.label_fraction_sweep \
    --config=configs/sweeps/pneumoniamnist_input_recipes.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/pneumoniamnist_input_recipes

(`--config=configs/sweeps/pneumoniamnist_input_recipes.py:/other/pretraining/workdir` when the
SimCLR run is not in workdirs/simclr_pneumoniamnist.)

Round 1 (configs/sweeps/pneumoniamnist_recipes.py) chose how the encoder may move: the head alone
for the first half of the steps, then everything (`head_first`). Every recipe here keeps that and
changes only the input of fine-tuning, at 10% of the labels over the sweep's three seeds (each
seed its own labeled subset):

  head_first       round 1's winner: 28 px, no augmentation (the MedMNIST v2 protocol).
  px32             the encoder sees images at its pretraining resolution (32 px; evaluation
                   resizes to 32 as well).
  px32_aug         32 px with a mild random resized crop (area 0.8-1) and a left-right flip.
  aug              28 px with the same augmentation.

The winner by mean validation macro AUC becomes configs/sweeps/pneumoniamnist.py's SIMCLR_RECIPE.
Part of the superseded exploratory rounds: experiments/results/pneumoniamnist_input_recipes/.
"""

import ml_collections

from configs.sweeps import pneumoniamnist_recipes

_HEAD_FIRST = pneumoniamnist_recipes.RECIPES["head_first"]
AUG = "random_resized_crop({size}, area=(0.8, 1.0), aspect_ratio=(0.9, 1.1))|flip_lr"

RECIPES = {
    "head_first": dict(_HEAD_FIRST),
    "px32": {**_HEAD_FIRST, "data": {"image_size": 32, "train_ops": "resize(32)"}},
    "px32_aug": {**_HEAD_FIRST, "data": {"image_size": 32, "train_ops": AUG.format(size=32)}},
    "aug": {**_HEAD_FIRST, "data": {"train_ops": AUG.format(size=28)}},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the SimCLR pretraining workdir or export (default workdirs/simclr_pneumoniamnist)."""
  return pneumoniamnist_recipes.validation_sweep(
      {name: arg or pneumoniamnist_recipes.PRETRAINED for name in RECIPES}, RECIPES,
      label_fractions=(0.1,), seeds=(0, 1, 2), baseline="head_first")
