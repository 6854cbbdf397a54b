r"""Label-fraction sweep on real PneumoniaMNIST (MedMNIST v2 protocol), CPU-sized: about an hour.

  python -m experiments.label_fraction_sweep --config=configs/sweeps/pneumoniamnist.py \
    --config.overrides.data.path=../shared/data/pneumoniamnist.npz \
    --config.inits.remedis=workdirs/simclr_pneumoniamnist \
    --workdir=workdirs/sweep_pneumoniamnist --parallel=2

The file is yours (data.path has no default). REMEDIS here is a SimCLR run on the same images
without their labels, e.g.
  python -m remedis_jax.main --config=configs/pretrain_simclr.py:medmnist \
    --config.data.path=../shared/data/pneumoniamnist.npz --workdir=workdirs/simclr_pneumoniamnist
`:scratch` sweeps scratch only (no pretraining needed).

Grid: 1, 2, 5, 10, 25, 50, 100% of the 4708 training labels x 3 seeds x {scratch, remedis} =
42 runs of `configs/finetune.py:pneumoniamnist` (28 px, R_tiny, Adam, 100 epochs of the labeled
subset -- so a 1% run is 100 steps and a 100% run ~3700). Baseline: scratch on 100%; the
MedMNIST v2 ResNet-18 numbers (AUC 0.944, ACC 0.854) are in each run's results.json.
"""

import ml_collections

from experiments import label_fraction_sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = label_fraction_sweep.default_sweep_config()
  config.base = "configs/finetune.py:pneumoniamnist"
  config.label_fractions = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
  config.seeds = (0, 1, 2)
  config.inits = ml_collections.ConfigDict({"scratch": ""})
  if arg != "scratch":
    config.inits.remedis = "workdirs/simclr_pneumoniamnist"
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.overrides = ml_collections.ConfigDict({
      "data": {"path": ""},  # required: --config.overrides.data.path=/path/pneumoniamnist.npz
      "robustness": {"perturbations": ()},
  })
  return config
