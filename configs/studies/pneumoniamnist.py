r"""REMEDIS's label efficiency on PneumoniaMNIST under one declared protocol.

  python -m experiments.study --config=configs/studies/pneumoniamnist.py \
    --config.data_path=../shared/data/pneumoniamnist.npz --workdir=workdirs/pneumoniamnist_study

The protocol (what is compared, the selection rule, the seeds, the statistic) is
experiments/results/pneumoniamnist_study/README.md, written before the test split was read;
experiments/study.py runs it stage by stage (pretrain, tune, select, final, distill, report),
resuming and skipping finished runs. A partial rerun is the same command with overrides, e.g.
`--config.final.label_fractions='(0.1,)' --config.final.seeds='(0,1,2)'`.

Arms (every one fine-tunes `base`, the MedMNIST v2 protocol, with its own keys on top):
  scratch            random init; tuned over `tune.grid`.
  simclr             the study's SimCLR pretraining (train split only, no validation or test
                     images), fine-tuned linear-probe-first (head only for the first half of
                     the steps: the best recipe of earlier validation rounds); tuned over the
                     same grid with the same budget as scratch.
  simclr_linear      control: the same encoder frozen, a linear head (simclr's chosen setup).
  simclr_distilled   SimCLR v2's third step: a student from the same init and setup, trained on
                     every training image for `distill_epochs`, the labeled subset with its
                     labels and every other image with the final simclr run's probabilities.
  scratch_distilled  control: the same student recipe with scratch's setup and a scratch
                     teacher (no self-supervision anywhere).
"""

import ml_collections

# The input noise of the `aug` setups: a mild crop (area 0.8-1) and a left-right flip.
AUG = "random_resized_crop(28, area=(0.8, 1.0), aspect_ratio=(0.9, 1.1))|flip_lr"


def tuning_grid() -> dict[str, dict]:
  """Eight setups, the same for every tuned arm: schedule length x learning rate x input noise.

  100 or 300 epochs of the labeled subset (31 or 93 steps at 1%, 304 or 912 at 10%), Adam at
  the MedMNIST recipe's 1e-3 or 3e-3, with or without AUG. Early stopping is built in: the best
  of 20 validations per run (configs/finetune.py num_evaluations).
  """
  grid = {}
  for epochs in (100, 300):
    for lr in (1e-3, 3e-3):
      for aug in (False, True):
        name = f"ep{epochs}_lr{lr * 1e3:g}e-3{'_aug' if aug else ''}"
        setup = {"total_epochs": float(epochs), "optimizer": {"learning_rate": lr}}
        if aug:
          setup["data"] = {"train_ops": AUG}
        grid[name] = setup
  return grid


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study; `arg` 'smoke' shrinks every stage for a test (generated data, R_micro)."""
  config = ml_collections.ConfigDict()
  config.name = "pneumoniamnist_study"
  config.data_path = ""  # required: --config.data_path=/path/pneumoniamnist.npz
  config.base = "configs/finetune.py:pneumoniamnist"
  config.metric = "macro_auc"
  # Keys every fine-tuning run of the study gets (on top of `base`).
  config.overrides = ml_collections.ConfigDict({"robustness": {"perturbations": ()}})

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.config = "configs/pretrain_simclr.py:pneumoniamnist"
  config.pretrain.overrides = ml_collections.ConfigDict({
      "data": {"pretrain_split": "train"},  # the unlabeled TRAINING images only
  })

  # name -> {init: "" (scratch) or "pretrain" (this study's pretraining run), overrides, and
  # setup_from: "tune" (tuned over the grid) or the name of a tuned arm whose chosen setup
  # it takes}.
  config.arms = ml_collections.ConfigDict({
      "scratch": {"init": "", "setup_from": "tune", "overrides": {}},
      "simclr": {"init": "pretrain", "setup_from": "tune",
                 "overrides": {"encoder_frozen_fraction": 0.5}},
      "simclr_linear": {"init": "pretrain", "setup_from": "simclr",
                        "overrides": {"finetune_mode": "linear"}},
  })
  # Students: name -> teacher arm; the student takes the teacher's init and chosen setup.
  config.distill = ml_collections.ConfigDict({
      "students": {"simclr_distilled": "simclr", "scratch_distilled": "scratch"},
      "epochs": 20.0,  # over all training images (SimCLR v2's student: labeled + unlabeled)
  })
  config.baseline = "scratch"  # paired differences are against this arm, per seed
  # The headline SimCLR arm: the one with the higher mean best-validation value of its final runs.
  config.headline_candidates = ("simclr", "simclr_distilled")
  # Another site's test split that every final and student run also scores, zero-shot (none of
  # its labels or images in training or selection): "" = none; e.g.
  # --config.zero_shot.path=../shared/data/adult_cxr.npz (adult chest X-rays, other hospitals).
  config.zero_shot = ml_collections.ConfigDict({
      "name": "adult_cxr", "path": "", "source": "medmnist", "split": "test"})

  config.tune = ml_collections.ConfigDict()
  config.tune.label_fractions = (0.01, 0.1)
  config.tune.seeds = (0, 1)
  config.tune.grid = ml_collections.ConfigDict(tuning_grid())

  config.final = ml_collections.ConfigDict()
  config.final.label_fractions = (0.01, 0.05, 0.1)
  config.final.seeds = (0, 1, 2, 3, 4)

  if arg == "smoke":  # every stage on generated data in about a minute of CPU (a test)
    config.base = "configs/finetune.py:medmnist"
    config.overrides = ml_collections.ConfigDict({
        "robustness": {"perturbations": ()}, "model": {"name": "R_micro"},
        "batch_size": 16, "eval_batch_size": 32, "num_evaluations": 2,
        "async_checkpointing": False, "mesh": {"devices": 1}})
    config.pretrain.config = "configs/pretrain_simclr.py:medmnist"
    config.pretrain.overrides = ml_collections.ConfigDict({
        "data": {"pretrain_split": "train", "image_size": 28}, "model": {"name": "R_micro"},
        "batch_size": 16, "total_steps": 2, "total_epochs": -1.0, "mesh": {"devices": 1}})
    config.arms = ml_collections.ConfigDict({
        "scratch": {"init": "", "setup_from": "tune", "overrides": {}},
        "simclr": {"init": "pretrain", "setup_from": "scratch", "overrides": {}}})
    config.distill.students = ml_collections.ConfigDict({"scratch_distilled": "scratch"})
    config.tune.grid = ml_collections.ConfigDict({
        "ep1": {"total_epochs": 1.0},
        "ep2": {"total_epochs": 2.0}})
    config.tune.label_fractions = (0.5,)
    config.tune.seeds = (0,)
    config.final.label_fractions = (0.5,)
    config.final.seeds = (0,)
    config.distill.epochs = 1.0
    config.headline_candidates = ("simclr",)
  elif arg:
    raise ValueError(f"configs/studies/pneumoniamnist.py: unknown argument {arg!r}; use none "
                     "or 'smoke'")
  return config
