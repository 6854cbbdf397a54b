r"""Which fine-tuning recipe keeps what SimCLR learned? Chosen on VALIDATION only (PneumoniaMNIST).

  python -m experiments.label_fraction_sweep --config=configs/sweeps/pneumoniamnist_recipes.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/pneumoniamnist_recipes

(`--config=configs/sweeps/pneumoniamnist_recipes.py:/other/pretraining/workdir` when the SimCLR
run is not in workdirs/simclr_pneumoniamnist.)

Every run fine-tunes the same SimCLR encoder (configs/pretrain_simclr.py:pneumoniamnist) with
`configs/finetune.py:pneumoniamnist` at 1% and 10% of the labels, seeds 0-2, and is scored on
the validation split only (`test_sets=("validation=val",)`: the test split is never read
here). The recipes differ only in how the encoder is allowed to move
(train_finetune.scale_encoder_updates):

  full            the MedMNIST v2 protocol as is (Adam 1e-3 on every parameter).
  encoder_lr_x01  the encoder at 0.1 x the head's learning rate.
  encoder_lr_x03  the encoder at 0.3 x.
  head_first      linear probe, then fine-tune: head only for the first half of the steps.
  linear          the encoder frozen throughout (linear evaluation).
  head_layer      SimCLR v2: the classifier sits on the pretrained first projection-head layer
                  (256 units), which fine-tunes with the encoder (model.from_head_layer).
  head_layer_first  head_layer, with the encoder and that layer frozen for the first half.
  head_first_200ep  head_first over 200 epochs of the labeled subset instead of 100 (the
                  10% runs of the exploratory sweep kept their last evaluation as the best
                  one, so a longer schedule might still gain).
  head_first_200ep_balanced  head_first_200ep with the loss weighted by inverse class
                  frequency (`loss.class_weights="balanced"`): only 10% of this file's
                  training images are normal, against 26% of validation and 38% of test.

The winner, by mean validation macro AUC over the two fractions, is the `simclr` recipe of
configs/sweeps/pneumoniamnist.py. Every init points at the same pretraining run. Part of the
superseded exploratory rounds: experiments/results/pneumoniamnist_recipes/README.md.
"""

import ml_collections

from configs.sweeps import common as sweep_common

PRETRAINED = "workdirs/simclr_pneumoniamnist"
# The SimCLR pretraining runs compared in configs/sweeps/pneumoniamnist_encoders.py:
# name -> (pretraining workdir, the fine-tuning keys that the encoder itself needs).
ENCODERS = {
    "steps_1500": (PRETRAINED, {}),  # configs/pretrain_simclr.py:pneumoniamnist as is
    "steps_3000": ("workdirs/simclr_pneumoniamnist_3000", {}),
    "small_s2": ("workdirs/simclr_pneumoniamnist_small_s2", {"model": {"stem": "small_s2"}}),
    "r_small": ("workdirs/simclr_pneumoniamnist_r_small", {"model": {"name": "R_small"}}),
}
RECIPES = {
    "full": {},
    "encoder_lr_x01": {"encoder_lr_multiplier": 0.1},
    "encoder_lr_x03": {"encoder_lr_multiplier": 0.3},
    "head_first": {"encoder_frozen_fraction": 0.5},
    "linear": {"finetune_mode": "linear"},
    "head_layer": {"model": {"from_head_layer": True}},
    "head_layer_first": {"model": {"from_head_layer": True}, "encoder_frozen_fraction": 0.5},
    "head_first_200ep": {"encoder_frozen_fraction": 0.5, "total_epochs": 200.0},
    "head_first_200ep_balanced": {"encoder_frozen_fraction": 0.5, "total_epochs": 200.0,
                                  "loss": {"class_weights": "balanced"}},
}


def merged(recipe: dict, needs: dict) -> dict:
  """`recipe` with the encoder's own keys on top, nested blocks merged (not replaced)."""
  out = dict(recipe)
  for key, value in needs.items():
    out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def validation_sweep(inits: dict[str, str], init_overrides: dict[str, dict], *,
                     label_fractions: tuple[float, ...], seeds: tuple[int, ...],
                     baseline: str) -> ml_collections.ConfigDict:
  """A sweep of configs/finetune.py:pneumoniamnist runs scored on the VALIDATION split only.

  The recipe rounds share it (this file, pneumoniamnist_input_recipes.py,
  pneumoniamnist_encoders.py): the test split is never read by these sweeps.
  """
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:pneumoniamnist"
  config.label_fractions = label_fractions
  config.seeds = seeds
  config.inits = ml_collections.ConfigDict(inits)
  config.init_overrides = ml_collections.ConfigDict(init_overrides)
  config.baseline = baseline
  config.baseline_fraction = 0.1
  config.metric = "macro_auc"
  config.overrides = ml_collections.ConfigDict({
      "data": {"path": ""},  # required: --config.overrides.data.path=/path/pneumoniamnist.npz
      "robustness": {"perturbations": ()},
      "test_sets": ("validation=val",),
  })
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the SimCLR pretraining workdir or export (default workdirs/simclr_pneumoniamnist)."""
  return validation_sweep({name: arg or PRETRAINED for name in RECIPES},
                          {name: recipe for name, recipe in RECIPES.items() if recipe},
                          label_fractions=(0.01, 0.1), seeds=(0, 1, 2), baseline="full")
