r"""The quickstart on PneumoniaMNIST: SimCLR without labels, then scratch vs SimCLR fine-tuning.

`make quickstart` runs both stages (experiments/quickstart.py); by hand, with the file in
~/.medmnist/ (where the quickstart downloads it):

  python -m remedis_jax.main --config=configs/pretrain_simclr.py:pneumoniamnist \
    --config.data.path=$HOME/.medmnist/pneumoniamnist.npz --config.data.pretrain_split=train \
    --config.total_steps=500 --config.knn.every_steps=250 --config.linear_probe.enabled=false \
    --workdir=workdirs/quickstart/pneumoniamnist/pretrain_simclr
  python -m experiments.label_fraction_sweep --config=configs/sweeps/quickstart_pneumoniamnist.py \
    --config.inits.simclr=workdirs/quickstart/pneumoniamnist/pretrain_simclr \
    --workdir=workdirs/quickstart/pneumoniamnist/sweep

Pretraining: `configs/pretrain_simclr.py:pneumoniamnist` on the training images only, without
their labels, for PRETRAIN_STEPS steps instead of 1500, so that the whole quickstart fits in
15 minutes on a 2-core CPU (the study's encoder, configs/studies/pneumoniamnist.py, takes 1500).
Fine-tuning: 1% and 10% of the training labels x seeds 0, 1, 2 x {scratch, simclr} = 12 runs of
`configs/finetune.py:pneumoniamnist` (the MedMNIST v2 protocol: 28 px, R_tiny, Adam 1e-3, 100
epochs of the labeled subset, best of 20 validations), scored on the test split. Scratch keeps
the protocol as published (untuned); SimCLR trains its head alone for the first half of the
steps (`encoder_frozen_fraction=0.5`, the best recipe of the earlier validation rounds). Each
seed draws one labeled subset that both inits see, so the summary's paired difference per seed
says whether SimCLR is ahead. A demonstration at CPU scale, not the study's evidence
(experiments/results/pneumoniamnist_study/README.md).
"""

import ml_collections

from data_pipelines import download
from configs.sweeps import common as sweep_common

PRETRAIN_CONFIG = "configs/pretrain_simclr.py:pneumoniamnist"
# 500 steps of batch 128 are 14 epochs of the official file's 4708 training images.
PRETRAIN_STEPS = 500
LABEL_FRACTIONS = (0.01, 0.1)
SEEDS = (0, 1, 2)


def default_data_path() -> str:
  """Where the quickstart finds or downloads the file: $MEDMNIST_DIR or ~/.medmnist."""
  return f"{download.default_folder()}/{download.OFFICIAL_FILES['pneumoniamnist'].file_name}"


def pretrain_overrides(data_path: str) -> dict:
  """The keys the quickstart sets on PRETRAIN_CONFIG (dotted, for configs.common.override)."""
  return {
      "data.path": data_path,
      # REMEDIS stage 2 on the training images only: no validation or test image is seen.
      "data.pretrain_split": "train",
      "total_steps": PRETRAIN_STEPS,
      # The kNN monitor at step 0 (the random encoder) and at the end already compares the
      # frozen encoder with a random one; the end-of-run linear probe would repeat that at the
      # cost of a sizeable share of this short run.
      "knn.every_steps": PRETRAIN_STEPS // 2,
      "linear_probe.enabled": False,
      "checkpoint_every_steps": PRETRAIN_STEPS // 2,
  }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The fine-tuning sweep; `arg` 'scratch' sweeps scratch only (no pretraining needed)."""
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:pneumoniamnist"
  config.label_fractions = LABEL_FRACTIONS
  config.seeds = SEEDS
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  if arg != "scratch":
    config.inits.simclr = "workdirs/quickstart/pneumoniamnist/pretrain_simclr"
    config.init_overrides = ml_collections.ConfigDict(
        {"simclr": {"encoder_frozen_fraction": 0.5}})
  config.baseline = "scratch"
  # "Matches the baseline" against scratch at 10%: no 100% runs, which would cost more than
  # the rest of the grid.
  config.baseline_fraction = LABEL_FRACTIONS[-1]
  config.metric = "macro_auc"
  config.overrides = ml_collections.ConfigDict({
      "data": {"path": default_data_path()},
      # Robustness perturbations re-run the test set 6 times: not what this sweep measures.
      "robustness": {"perturbations": ()},
  })
  return config
