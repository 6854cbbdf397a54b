r"""Does SimCLR v2's distillation through the unlabeled images pay? Chosen on VALIDATION only.

  # needs the recipe round's finished head_first runs (README command 2) as teachers
  python -m experiments.label_fraction_sweep --config=configs/sweeps/pneumoniamnist_distill.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/pneumoniamnist_distill

(`--config=configs/sweeps/pneumoniamnist_distill.py:/other/recipes/sweep` when the recipe round
ran elsewhere than workdirs/pneumoniamnist_recipes.)

SimCLR v2 (Chen et al. 2020, section 2.3) ends with a third step: the fine-tuned network labels
every training image, labeled or not, and a student learns from those targets. Here, at 1% and
10% of the labels, seeds 0-2, scored on the validation split only:

  head_first   the teacher itself: configs/sweeps/pneumoniamnist_recipes.py's `head_first` run
               of the same fraction and seed (its finished runs are read, or rerun here).
  distilled    the student: the same SimCLR encoder and recipe, trained on all 3882 training
               images for 20 epochs (607 steps at batch 128: about twice the 10% teacher's and
               ten times the 1% teacher's), the teacher's subset with its own labels and
               every other image with the teacher's class probabilities (temperature 1;
               `config.distill`, remedis_jax/distillation.py). No label outside the teacher's
               subset is read.

The student's label budget is the teacher's: a gain is what the unlabeled images add.
"""

import ml_collections

from configs.sweeps import pneumoniamnist_recipes
from remedis_jax import storage

RECIPES_SWEEP = "workdirs/pneumoniamnist_recipes"
TEACHER = "head_first"
STUDENT = {**pneumoniamnist_recipes.RECIPES[TEACHER], "total_epochs": 20.0,
           "distill": {"temperature": 1.0}}


def teacher_template(recipes_sweep: str) -> str:
  """The teacher run of each (fraction, seed): a config.distill.teacher placeholder path."""
  return storage.join(storage.absolute(recipes_sweep),
                      f"init={TEACHER}/frac={{label_fraction:g}}/seed={{label_fraction_seed}}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the recipe round's sweep workdir (default workdirs/pneumoniamnist_recipes)."""
  student = pneumoniamnist_recipes.merged(
      STUDENT, {"distill": {"teacher": teacher_template(arg or RECIPES_SWEEP)}})
  pretrained = pneumoniamnist_recipes.PRETRAINED
  return pneumoniamnist_recipes.validation_sweep(
      {TEACHER: pretrained, "distilled": pretrained},
      {TEACHER: pneumoniamnist_recipes.RECIPES[TEACHER], "distilled": student},
      label_fractions=(0.01, 0.1), seeds=(0, 1, 2), baseline=TEACHER)
