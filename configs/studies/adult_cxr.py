r"""REMEDIS's second claim on real data: a new clinical site with few of its labels.

  python -m experiments.study --config=configs/studies/adult_cxr.py \
    --config.data_path=../shared/data/adult_cxr.npz \
    --config.source_data_path=../shared/data/pneumoniamnist.npz \
    --config.source_pretrain=workdirs/pneumoniamnist_study/pretrain \
    --workdir=workdirs/adult_cxr_study

The new site: adult chest X-rays from other hospitals and countries (normal vs COVID-19
pneumonia, MedMNIST layout, 28 px; ../shared/data/README.md). Its zero-shot half (the
PneumoniaMNIST models scored on its test split) runs inside configs/studies/pneumoniamnist.py
(`config.zero_shot`); this study is the data-efficient half, under the same protocol
(experiments/results/adult_cxr_study/README.md): fine-tuning on 1-100% of the site's training
labels from

  scratch        a random init.
  simclr_source  the PneumoniaMNIST study's SimCLR encoder (`config.source_pretrain`), never
                 shown an adult image.
  simclr_both    SimCLR on the unlabeled training images of both sets (3882 + 2348), the same
                 pretraining recipe.

and a logistic regression on raw pixels at the same fractions and seeds (the site's classes come
from different sources, so pixels alone separate them partly). Every network arm fine-tunes with
`SETUP`, the setup the PneumoniaMNIST study chose on its validation split for scratch and SimCLR
alike, fixed before this study (no tuning on this site; `setup_from="tune"` restores the site's
own tuning grid). Every arm runs at 1-10% of the labels, scratch also at 100%
(`final.baseline_fraction`). The headline: the smallest fraction at which a SimCLR arm's mean
test AUC reaches scratch's with 100% of the labels (summary.md, with the interval of the cell).
"""

import ml_collections

from configs.studies import pneumoniamnist

# What the PneumoniaMNIST study chose on its validation split, for scratch and SimCLR alike.
SETUP = "ep300_lr3e-3_aug"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study; `arg` 'smoke' shrinks every stage for a test (generated data, R_micro)."""
  config = pneumoniamnist.get_config("smoke" if arg == "smoke" else None)
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/studies/adult_cxr.py: unknown argument {arg!r}; use none or "
                     "'smoke'")
  config.name = "adult_cxr_study"
  config.base = "configs/finetune.py:medmnist"
  config.data_path = ""         # required: the new site, e.g. ../shared/data/adult_cxr.npz
  config.source_data_path = ""  # required: the in-distribution .npz whose images join pretraining
  config.source_pretrain = ""   # required: the in-distribution study's pretraining workdir
  config.pretrain.overrides.data.pretrain_split = "train+train@medmnist:{source_data_path}"
  config.arms = ml_collections.ConfigDict({
      "scratch": {"init": "", "setup_from": SETUP, "overrides": {}},
      "simclr_source": {"init": "source_pretrain", "setup_from": SETUP,
                        "overrides": {"encoder_frozen_fraction": 0.5}},
      "simclr_both": {"init": "pretrain", "setup_from": SETUP,
                      "overrides": {"encoder_frozen_fraction": 0.5}},
  })
  config.distill.students = ml_collections.ConfigDict()
  config.headline_candidates = ()
  config.zero_shot.path = ""
  config.raw_pixel_baseline = True
  config.final.label_fractions = (0.01, 0.02, 0.05, 0.1)
  config.final.baseline_fraction = 1.0  # scratch (and the raw-pixel row) with every label
  if arg == "smoke":
    config.arms = ml_collections.ConfigDict({
        "scratch": {"init": "", "setup_from": "tune", "overrides": {}},
        "simclr_both": {"init": "pretrain", "setup_from": "scratch", "overrides": {}}})
    config.final.label_fractions = (0.5,)
  return config
