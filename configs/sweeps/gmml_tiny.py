r"""Label-fraction sweep for GMML at CPU scale: ResNet scratch vs ViT scratch vs a
GMML-pretrained ViT, on the built-in synthetic chest X-rays.

  # 1. GMML pretraining of ViT-tiny/4 (configs/pretrain_gmml.py:tiny) into the default path:
  python -m remedis_jax.main --config=configs/pretrain_gmml.py:tiny --workdir=workdirs/gmml/pretrain
  # 2. the sweep:
  python -m experiments.label_fraction_sweep --config=configs/sweeps/gmml_tiny.py \
    --workdir=workdirs/gmml/sweep

Inits (each runs `configs/finetune.py:tiny`, 800 steps at 32 px, site A; tested at sites A, B):
  scratch      R_tiny from random weights: the baseline (its run with 100% of the labels is the
               reference line), the same runs as configs/sweeps/tiny.py;
  vit_scratch  ViT-tiny/4 from random weights: what the architecture alone does;
  gmml_vit     ViT-tiny/4 initialised from the GMML pretraining run's encoder.
The two ViT inits differ from the base config only by `init_overrides`
(configs/finetune.py:vit_tiny_recipe: the model and its AdamW optimiser), so every other setting
(schedule, augmentation, test sets) is shared by all three.
Grid: 3 label fractions (2%, 10%, 100%) x 2 seeds = 6 runs per init, 18 in all. A ViT-tiny/4
step costs several times an R_tiny step on a CPU (64 tokens of width 96 at every layer, where
the ResNet downsamples): expect minutes per ViT run there, seconds on a GPU or TPU.
Expect the GMML ViT above the scratch ViT and both far below R_tiny
(experiments/results/gmml_tiny/README.md).

Other pretraining runs: `--config.inits.gmml_vit=<workdir or export>`. Without GMML pretraining,
`--config=configs/sweeps/gmml_tiny.py:scratch` sweeps scratch and vit_scratch only.
Like configs/sweeps/tiny.py, the numbers are a CPU-scale demonstration, not evidence.
"""

import ml_collections

from configs import finetune
from configs.sweeps import common as sweep_common

VIT = "ViT-tiny/4"
GMML_WORKDIR = "workdirs/gmml/pretrain"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "scratch"):
    raise ValueError(f"configs/sweeps/gmml_tiny.py: unknown argument {arg!r}; use no argument "
                     "or ':scratch'")
  config = sweep_common.default_sweep_config()
  config.base = "configs/finetune.py:tiny"
  config.label_fractions = (0.02, 0.1, 1.0)
  config.seeds = (0, 1)
  config.inits = ml_collections.ConfigDict({"scratch": "", "vit_scratch": ""})
  # The ViT inits fine-tune with configs/finetune.py:tiny_vit's recipe (ViT-tiny/4, AdamW);
  # the ResNet baseline keeps tiny's SGD.
  config.init_overrides = ml_collections.ConfigDict({"vit_scratch": finetune.vit_tiny_recipe()})
  if arg != "scratch":
    config.inits.gmml_vit = GMML_WORKDIR
    config.init_overrides.gmml_vit = ml_collections.ConfigDict(finetune.vit_tiny_recipe())
  config.baseline = "scratch"
  config.baseline_fraction = 1.0
  config.metric = "macro_auc"
  config.match_tolerance = 0.0
  # The same shared settings as configs/sweeps/tiny.py (see the reasons there).
  config.overrides = ml_collections.ConfigDict({
      "total_steps": 800,
      "eval_every_steps": 100,
      "test_sets": ("in_distribution=test@A", "site_B=test@B"),
      "robustness": {"perturbations": ()},
      "data": {"num_examples": {"val": 256, "test": 512}},
  })
  return config
