r"""Does SimCLR v2's distillation through the unlabeled images pay? Chosen on VALIDATION only.

  # teachers: the finished head_first runs of configs/sweeps/pneumoniamnist_recipes.py
  python -m experiments.label_fraction_sweep --config=configs/sweeps/pneumoniamnist_distill.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/pneumoniamnist_distill

(`--config=configs/sweeps/pneumoniamnist_distill.py:/other/recipes/sweep` when the recipe round
ran elsewhere than workdirs/pneumoniamnist_recipes.) The choice then runs once on TEST at 10% of
the labels, its teachers the `simclr` runs of the exploratory table
(`configs/sweeps/pneumoniamnist.py:head_first@steps_1500`; `:test@/that/sweep` when its workdir
is not workdirs/sweep_pneumoniamnist):

  python -m experiments.label_fraction_sweep \
    --config=configs/sweeps/pneumoniamnist_distill.py:test \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --workdir=workdirs/sweep_pneumoniamnist_distilled_10pct

and `:table` runs the chosen student at every fraction of that table below 100%. Part of the
superseded exploratory rounds (experiments/results/pneumoniamnist/README.md).

SimCLR v2 (Chen et al. 2020, section 2.3) ends with a third step: the fine-tuned network labels
every training image, labeled or not, and a student learns from those targets. Here, at 1% and
10% of the labels, seeds 0-2, scored on the validation split only:

  head_first   the teacher itself: configs/sweeps/pneumoniamnist_recipes.py's `head_first` run
               of the same fraction and seed (its finished runs are read, or rerun here).
  distilled    the student: the same SimCLR encoder and recipe, trained on all 3882 training
               images for 20 epochs (600 steps at batch 128: twice the 10% teacher's and
               six times the 1% teacher's), the teacher's subset with its own labels and
               every other image with the teacher's class probabilities (temperature 1;
               `config.distill`, remedis_jax/distillation.py). No label outside the teacher's
               subset is read.
  distilled_t2   the student at temperature 2: softer targets (the teachers are confident:
               the first students' training loss fell to ~0.03).
  distilled_aug  the student with input noise (Noisy Student, Xie et al. 2020): the input
               round's mild crop (area 0.8-1) and left-right flip.

The student's label budget is the teacher's: a gain is what the unlabeled images add. The first
pass ran `distilled` alone; the winner by mean validation macro AUC over both fractions is
CHOSEN, the student of the test round.

Expect all three students within the seeds' spread of each other and of their teachers
(experiments/results/pneumoniamnist_distill/README.md).
"""

import ml_collections

from configs.sweeps import pneumoniamnist, pneumoniamnist_input_recipes
from configs.sweeps import pneumoniamnist_recipes
from data_pipelines import storage

RECIPES_SWEEP = "workdirs/pneumoniamnist_recipes"
# The workdir of configs/sweeps/pneumoniamnist.py:head_first@steps_1500 (the teachers).
TABLE_SWEEP = "workdirs/sweep_pneumoniamnist"
TEACHER = "head_first"
_STUDENT = {**pneumoniamnist_recipes.RECIPES[TEACHER], "total_epochs": 20.0,
            "distill": {"temperature": 1.0}}
STUDENTS = {
    "distilled": _STUDENT,
    "distilled_t2": {**_STUDENT, "distill": {"temperature": 2.0}},
    "distilled_aug": {**_STUDENT, "data": {"train_ops": pneumoniamnist_input_recipes.AUG.format(
        size=28)}},
}
CHOSEN = "distilled_aug"
TABLE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


def teacher_template(sweep: str, init: str = TEACHER) -> str:
  """The teacher run of each (fraction, seed): a config.distill.teacher placeholder path."""
  return storage.join(storage.absolute(sweep),
                      f"init={init}/frac={{label_fraction:g}}/seed={{label_fraction_seed}}")


def test_config(table_sweep: str, name: str = CHOSEN,
                label_fractions: tuple[float, ...] = (0.1,)) -> ml_collections.ConfigDict:
  """On test: the table's `simclr` runs (head_first) and student `name`, at 10% of the labels
  (or `label_fractions`)."""
  if name not in STUDENTS:
    raise ValueError(f"configs/sweeps/pneumoniamnist_distill.py: unknown student {name!r}; "
                     f"students: {', '.join(STUDENTS)}")
  config = pneumoniamnist.get_config(f"{TEACHER}@steps_1500")
  student = pneumoniamnist_recipes.merged(
      STUDENTS[name], {"distill": {"teacher": teacher_template(table_sweep, "simclr")}})
  config.inits = ml_collections.ConfigDict({"simclr": config.inits.simclr,
                                            name: config.inits.simclr})
  config.init_overrides = ml_collections.ConfigDict(
      {"simclr": pneumoniamnist_recipes.RECIPES[TEACHER], name: student})
  config.label_fractions, config.baseline, config.baseline_fraction = (
      tuple(label_fractions), "simclr", 0.1)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the recipe round's sweep workdir (default workdirs/pneumoniamnist_recipes), or
  'test[,STUDENT][@TABLE_SWEEP]' for the test round at 10% of the labels, or
  'table[,STUDENT][@TABLE_SWEEP]' for every fraction of the exploratory table below 100% (where
  no image is unlabeled); default student CHOSEN, teachers in workdirs/sweep_pneumoniamnist."""
  mode = (arg or "").partition("@")[0].partition(",")[0]
  if mode in ("test", "table"):
    head, _, table_sweep = arg.partition("@")
    fractions = (0.1,) if mode == "test" else TABLE_FRACTIONS
    return test_config(table_sweep or TABLE_SWEEP, head.partition(",")[2] or CHOSEN, fractions)
  teacher = {"distill": {"teacher": teacher_template(arg or RECIPES_SWEEP)}}
  recipes = {TEACHER: pneumoniamnist_recipes.RECIPES[TEACHER],
             **{name: pneumoniamnist_recipes.merged(student, teacher)
                for name, student in STUDENTS.items()}}
  return pneumoniamnist_recipes.validation_sweep(
      {name: pneumoniamnist_recipes.PRETRAINED for name in recipes}, recipes,
      label_fractions=(0.01, 0.1), seeds=(0, 1, 2), baseline=TEACHER)
