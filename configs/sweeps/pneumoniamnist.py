r"""PneumoniaMNIST label-fraction sweep, scratch vs SimCLR: the earlier exploratory rounds.

Superseded by the study under a declared protocol (configs/studies/pneumoniamnist.py,
experiments/results/pneumoniamnist_study/README.md); kept to reproduce the exploratory table
and its rounds (experiments/results/pneumoniamnist/README.md, which has every command):

  # the SimCLR encoder (configs/pretrain_simclr.py:pneumoniamnist), then the sweep
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:pneumoniamnist \
    --config.data.path=../shared/data/pneumoniamnist.npz --workdir=workdirs/simclr_pneumoniamnist
  python -m experiments.label_fraction_sweep \
    --config=configs/sweeps/pneumoniamnist.py:head_first@steps_1500 \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/sweep_pneumoniamnist

The file is yours (data.path has no default). `:scratch` sweeps scratch only (no pretraining
needed); `:RECIPE` or `:RECIPE@ENCODER` picks the SimCLR half's fine-tuning recipe and
pretraining run by name (pneumoniamnist_recipes.RECIPES and .ENCODERS); no argument takes
SIMCLR_RECIPE and SIMCLR_ENCODER, the last choices made on validation.

Grid: 1, 2, 5, 10, 25, 50, 100% of the 3882 training labels x 3 seeds x {scratch, simclr} = 42
runs of `configs/finetune.py:pneumoniamnist` (the MedMNIST v2 protocol: 28 px, R_tiny, Adam 1e-3,
batch 128, 100 epochs of the labeled subset, best checkpoint on validation). Each seed draws its
own stratified labeled subset (nested across fractions). Scratch keeps the protocol as is (BiT's
stem, untuned). Baseline: scratch on 100%; the MedMNIST v2 ResNet-18 numbers (AUC 0.944, ACC
0.854) are in each run's results.json.
"""

import ml_collections

from configs.sweeps import pneumoniamnist_recipes
from configs.sweeps import common as sweep_common

# Chosen in configs/sweeps/pneumoniamnist_recipes.py on validation (a tie with head_first and
# head_first_200ep; scores: experiments/results/pneumoniamnist_recipes/README.md).
SIMCLR_RECIPE = "head_first_200ep_balanced"
# Chosen in configs/sweeps/pneumoniamnist_encoders.py on validation, with SIMCLR_RECIPE
# (scores: experiments/results/pneumoniamnist_encoders/README.md).
SIMCLR_ENCODER = "small_s2"


def parse_arg(arg: str | None) -> tuple[str, str] | None:
  """'' -> (SIMCLR_RECIPE, SIMCLR_ENCODER); 'scratch' -> None; 'RECIPE' -> (RECIPE,
  SIMCLR_ENCODER); 'RECIPE@ENCODER' -> both named. Unknown names are a ValueError."""
  if arg == "scratch":
    return None
  recipe, _, encoder = (arg or "").partition("@")
  recipe, encoder = recipe or SIMCLR_RECIPE, encoder or SIMCLR_ENCODER
  recipes, encoders = pneumoniamnist_recipes.RECIPES, pneumoniamnist_recipes.ENCODERS
  if recipe not in recipes or encoder not in encoders:
    raise ValueError(f"configs/sweeps/pneumoniamnist.py: unknown argument {arg!r}; use no "
                     "argument (scratch and simclr), ':scratch', ':RECIPE' or "
                     f"':RECIPE@ENCODER', with RECIPE one of {', '.join(recipes)} "
                     "(configs/sweeps/pneumoniamnist_recipes.py) and ENCODER one of "
                     f"{', '.join(encoders)} (configs/sweeps/pneumoniamnist_encoders.py)")
  return recipe, encoder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """No argument: scratch, and SimCLR (SIMCLR_ENCODER fine-tuned with SIMCLR_RECIPE);
  ':scratch': scratch only; ':RECIPE' or ':RECIPE@ENCODER' (names of
  pneumoniamnist_recipes.RECIPES and .ENCODERS): scratch, and SimCLR with that recipe and
  encoder, e.g. ':head_first@steps_1500' for the exploratory table."""
  simclr = parse_arg(arg)
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:pneumoniamnist"
  config.label_fractions = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
  config.seeds = (0, 1, 2)
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  if simclr is not None:
    recipe, encoder = simclr
    workdir, needs = pneumoniamnist_recipes.ENCODERS[encoder]
    config.inits.simclr = workdir
    overrides = pneumoniamnist_recipes.merged(pneumoniamnist_recipes.RECIPES[recipe], needs)
    if overrides:
      config.init_overrides = ml_collections.ConfigDict({"simclr": overrides})
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.overrides = ml_collections.ConfigDict({
      "data": {"path": ""},  # required: --config.overrides.data.path=/path/pneumoniamnist.npz
      "robustness": {"perturbations": ()},
  })
  return config
