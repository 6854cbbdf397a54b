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

  scratch        a random init; tuned on the site's validation split.
  simclr_source  the PneumoniaMNIST study's SimCLR encoder (`config.source_pretrain`), never
                 shown an adult image; tuned with the same grid and budget.
  simclr_both    SimCLR on the unlabeled training images of both sets (3882 + 2348), the same
                 pretraining recipe; tuned with the same grid and budget.

and a logistic regression on raw pixels at the same fractions and seeds (the site's classes come
from different sources, so pixels alone separate them partly). The headline: the smallest
fraction at which a SimCLR arm's mean test AUC reaches scratch's with 100% of the labels
(summary.md's first table, with the interval of the matching cell).
"""

import ml_collections

from configs.studies import pneumoniamnist


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
      "scratch": {"init": "", "setup_from": "tune", "overrides": {}},
      "simclr_source": {"init": "source_pretrain", "setup_from": "tune",
                        "overrides": {"encoder_frozen_fraction": 0.5}},
      "simclr_both": {"init": "pretrain", "setup_from": "tune",
                      "overrides": {"encoder_frozen_fraction": 0.5}},
  })
  config.distill.students = ml_collections.ConfigDict()
  config.headline_candidates = ()
  config.zero_shot.path = ""
  config.raw_pixel_baseline = True
  config.final.label_fractions = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
  if arg == "smoke":
    config.arms = ml_collections.ConfigDict({
        "scratch": {"init": "", "setup_from": "tune", "overrides": {}},
        "simclr_both": {"init": "pretrain", "setup_from": "scratch", "overrides": {}}})
    config.final.label_fractions = (0.5, 1.0)
  return config
